"""A hub model fetched as the first part of a job, before `accelerate launch`: progress, a disk check, resumable.

Without it every rank downloads the model inside its own set-up with progress bars off: a 16 GB download shows
"running, step 0" for twenty minutes with no log and no ETA, a full disk fails late, and on a cluster a slow node
keeps the others waiting at the first collective. Here the supervisor fetches the snapshot once into the
Hugging Face cache (huggingface_hub resumes a cancelled download where it stopped), records
`{"event": "download", ...}` lines in metrics.jsonl (bytes, rate, ETA: job_status shows them), and checks the free
space against the repository's size first.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_mcp.core.hub_datasets import cache_dir, offline
from llm_mcp.core.jobconfig import EvalConfig, JobConfig

# What training and sampling read: weights as safetensors, configs, tokenizer files, chat templates; never the
# duplicates repositories also carry (Llama's original/*.pth, .bin, GGUF, ONNX, Flax).
SKIP = ["original/*", "*.pth", "*.bin", "*.pt", "*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ckpt"]
PROGRESS_EVERY_S = 2.0
MARGIN_BYTES = 1 << 30  # left free beside the model


def wanted(filename: str) -> bool:
    import fnmatch

    return not any(fnmatch.fnmatch(filename, pattern) for pattern in SKIP)


def room_needed(total: int, have: int, free: int, where: Path) -> str | None:
    """Why `total` bytes (of which `have` are already cached) do not fit in `free` bytes at `where`, or None."""
    need = max(0, total - have) + MARGIN_BYTES
    if free >= need:
        return None
    return (
        f"No space left on device for the model: it needs {need / 2**30:.1f} GB more and {free / 2**30:.1f} GB is free "
        f"in {where}; free disk space or point HF_HUB_CACHE at a larger disk, then resume_from this job"
    )


def _size(directory: Path) -> int:
    try:
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    except OSError:
        return 0


def fetch_model(cfg: JobConfig | EvalConfig, metric: Callable[[dict[str, Any]], None]) -> str | None:
    """Make sure the job's hub model is in the cache; None when it is, else the cause the job fails with."""
    if cfg.model.local or Path(cfg.model.path).is_dir():
        return None
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, cache = cfg.model.path, cache_dir()
    try:  # everything the job reads already here (a second job on the same model, or offline)
        snapshot_download(repo, cache_dir=cache, local_files_only=True, ignore_patterns=SKIP)
        metric({"event": "download", "state": "cached", "model": repo})
        return None
    except (LocalEntryNotFoundError, OSError, ValueError):
        if offline():
            return f"{repo} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: hf download {repo}"
    try:
        info = HfApi().model_info(repo, files_metadata=True, timeout=30)
    except Exception as exc:  # unreachable, gated, gone: the job says why in one line
        return f"cannot fetch {repo} from the Hugging Face Hub: {str(exc).splitlines()[0][:200]}"
    total = sum(s.size or 0 for s in info.siblings or [] if wanted(s.rfilename))
    blobs = cache / f"models--{repo.replace('/', '--')}" / "blobs"
    have = _size(blobs)
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    short = room_needed(total, have, shutil.disk_usage(probe).free, cache)
    if short:
        return short
    metric({"event": "download", "state": "downloading", "model": repo, "downloaded_bytes": have,
            "total_bytes": total})  # fmt: skip
    done = threading.Event()

    def report() -> None:
        start, first = time.monotonic(), have
        while not done.wait(PROGRESS_EVERY_S):
            now = _size(blobs) + sum(p.stat().st_size for p in blobs.glob("*.incomplete") if p.exists())
            rate = (now - first) / max(1e-6, time.monotonic() - start)
            left = max(0, total - now)
            eta = round(left / rate) if rate else None
            metric({"event": "download", "state": "downloading", "model": repo, "downloaded_bytes": now,
                    "total_bytes": total, "rate_bps": round(rate), "eta_s": eta})  # fmt: skip

    watcher = threading.Thread(target=report, daemon=True)
    watcher.start()
    try:
        snapshot_download(repo, cache_dir=cache, ignore_patterns=SKIP, revision=info.sha)
    except Exception as exc:  # the cause, in one line; what was downloaded stays and the next try resumes
        return f"downloading {repo} failed: {str(exc).splitlines()[0][:200]} (resume_from this job continues it)"
    finally:
        done.set()
    metric({"event": "download", "state": "done", "model": repo, "downloaded_bytes": total, "total_bytes": total})
    return None


def append_metric(path: Path) -> Callable[[dict[str, Any]], None]:
    """A metric writer for the supervisor: one JSON line per record, appended whole."""
    from llm_mcp.core import atomic

    def write(record: dict[str, Any]) -> None:
        data = (json.dumps({**record, "time": round(time.time(), 2)}) + "\n").encode()
        try:
            if not path.exists():
                path.touch()
            atomic.append(path, data)
        except OSError:
            pass  # progress is best effort; the download itself decides the job

    return write


def main(job_dir: str) -> int:
    """`python -m llm_mcp.jobs.fetch JOB_DIR`: a cluster job's first step, on every node, before the launch (a
    node still downloading would otherwise keep the others waiting at their first collective until it times out)."""
    from llm_mcp.core.jobconfig import parse_config
    from llm_mcp.core.jobdir import write_result

    path = Path(job_dir)
    cfg = parse_config(json.loads((path / "config.json").read_text()), str(path))
    cause = fetch_model(cfg, append_metric(path / "metrics.jsonl"))
    if cause is None:
        return 0
    print(f"[fetch] {cause}", flush=True)
    write_result(path, {"state": "failed", "error": cause, "next_step": "fix the cause, then start the job again"})
    return 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1]))
