"""Merged exports: a detached worker merges the adapter into its base; one lock per destination.

    python -m llm_mcp.inference.merge LOCK_FILE

The lock is created exclusively and names its owner (the worker), so two callers never merge into
one destination and a killed worker leaves a stale lock that the next call takes over.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.procs import detached
from llm_mcp.core.quiet import quiet_bitsandbytes
from llm_mcp.core.store import Job
from llm_mcp.inference.card import list_files, model_card

MERGE_WAIT_S = 25  # tool calls must answer within 30 s; a longer merge returns state "running"


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def run_merge(job: Job, job_dir: Path, adapter: Path, base: str, dest: Path, manifest: dict, result):
    """Start (or wait for) the detached merge process; up to MERGE_WAIT_S in this call.

    The lock file is created exclusively (one merge per destination, however many callers) and names
    its owner; a lock whose owner is gone is stale and is taken over, so a killed merge never blocks.
    """
    lock = dest.with_name(f".{dest.name}.lock")
    spec = {
        "job": {
            "id": job.id,
            "name": job.name,
            "method": job.method,
            "config": job.config.model_dump(mode="json"),
            "state": job.state,
            "created_at": job.created_at,
        },
        "adapter": str(adapter),
        "base": base,
        "dest": str(dest),
        "manifest": manifest,
        "job_dir": str(job_dir),
        "checkpoint": result.checkpoint,
    }
    if _claim(lock, spec):
        detached("llm_mcp.inference.merge", str(lock), dest.with_name(f".{dest.name}.log"), append=True)
    deadline = time.monotonic() + MERGE_WAIT_S
    while time.monotonic() < deadline and lock.exists() and not _stale(lock):
        time.sleep(0.25)
    error_file = dest.with_name(f".{dest.name}.error")
    if error_file.exists():
        message = error_file.read_text()
        error_file.unlink()
        raise InvalidArgumentError(f"the merge failed: {message}")
    if lock.exists() and _stale(lock):
        lock.unlink(missing_ok=True)
        raise InvalidArgumentError(
            "the merge process ended without finishing (killed?); call export_adapter again to start it over"
        )
    if lock.exists():
        result.state = "running"
        result.notes.append("the merge is still running; call export_adapter again with the same arguments")
        return result
    result.files = list_files(dest)
    return result


def merging(dest: Path) -> bool:
    """Whether a merge into `dest` is under way (its lock is held by a live worker)."""
    lock = dest.with_name(f".{dest.name}.lock")
    return lock.exists() and not _stale(lock)


def _claim(lock: Path, spec: dict) -> bool:
    """Create the lock exclusively; a stale one (its owner gone) is removed and claimed.
    False: a live merge holds it."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if not _stale(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"spec": spec, "owner": None, "claimed_at": time.time()}, fh)
        return True
    return False


def _stale(lock: Path, grace_s: float = 30.0) -> bool:
    """True when the lock's owner process is gone (or it never got one within `grace_s`)."""
    try:
        data = json.loads(lock.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return time.time() - lock.stat().st_mtime > grace_s if lock.exists() else False
    owner = data.get("owner")
    if not owner:
        return time.time() - data.get("claimed_at", 0) > grace_s
    try:
        proc = psutil.Process(owner["pid"])
        return abs(proc.create_time() - owner["started_at"]) > 1 or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def merge_main(lock_path: str) -> int:
    """Worker: load base (+ de-quantize for QLoRA), apply adapter, merge, save; then remove the lock."""
    quiet_bitsandbytes()  # first: before peft / transformers import bitsandbytes
    lock = Path(lock_path)
    data = json.loads(lock.read_text())
    data["owner"] = {"pid": os.getpid(), "started_at": psutil.Process().create_time()}
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, lock)  # from now on the lock is stale only if this process is gone
    spec = data["spec"]
    dest = Path(spec["dest"])
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        from transformers import AutoTokenizer

        from llm_mcp.modeling.adapters import adapter_of_method
        from llm_mcp.modeling.base import checkpoint_dtype, load_base

        cfg = JobConfig.parse(spec["job"]["config"])
        base_path = cfg.model.path
        trc = cfg.model.trust_remote_code
        if (q := cfg.quantization) is not None:  # de-quantized into the checkpoint's own dtype, not fp32
            model = load_base(
                base_path,
                dtype=checkpoint_dtype(base_path, trc),
                trust_remote_code=trc,
                quant_type=q.bnb_4bit_quant_type,
                double_quant=q.bnb_4bit_use_double_quant,
            ).dequantize()
        else:
            model = load_base(base_path, dtype="auto", trust_remote_code=trc)
        merged = adapter_of_method(cfg.method).merge(model, Path(spec["adapter"]))
        merged.save_pretrained(tmp, safe_serialization=True)
        tok_src = (
            Path(spec["adapter"]) if (Path(spec["adapter"]) / "tokenizer_config.json").exists() else Path(base_path)
        )
        AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trc).save_pretrained(tmp)
        for name in PROCESSOR_FILES:  # a vision-language model's image processor: the merged VLM serves images too
            if (Path(base_path) / name).is_file():
                shutil.copy2(Path(base_path) / name, tmp / name)
        job = Job(
            id=spec["job"]["id"],
            name=spec["job"]["name"],
            state=spec["job"]["state"],
            model=spec["base"],
            method=spec["job"]["method"],
            device_set="",
            created_at=spec["job"]["created_at"],
            config=cfg,
        )
        (tmp / "README.md").write_text(model_card(job, spec["checkpoint"], True, spec["base"], Path(spec["job_dir"])))
        (tmp / "export.json").write_text(json.dumps(spec["manifest"], indent=2))
        os.rename(tmp, dest)
        return 0
    except Exception as exc:  # reported to the waiting tool call through the error file
        dest.with_name(f".{dest.name}.error").write_text(f"{type(exc).__name__}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)
        return 1
    finally:
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(merge_main(sys.argv[1]))
