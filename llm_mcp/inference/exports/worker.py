"""The detached worker of background exports (merged, gguf): one per destination, holding its lock.

    python -m llm_mcp.inference.exports.worker LOCK_FILE

It writes the export into a temporary directory renamed into place, reports its stage in a progress file, and
leaves an error file for the waiting tool call when it fails (llm_mcp.inference.merge).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.quiet import quiet_bitsandbytes
from llm_mcp.core.store import Job
from llm_mcp.inference.exports.base import tokenizer_source

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def worker_job(spec: dict[str, Any]) -> Job:
    """The job a worker's spec names (as the tool call saw it)."""
    j = spec["job"]
    return Job(
        id=j["id"],
        name=j["name"],
        state=j["state"],
        model=spec["base"],
        method=j["method"],
        device_set="",
        created_at=j["created_at"],
        config=JobConfig.parse(j["config"]),
    )


def load_export_base(cfg: JobConfig):
    """The base model an adapter is merged into: the checkpoint as it is, or for QLoRA the NF4 base the adapter
    was trained on, de-quantized into the checkpoint's own dtype (not fp32)."""
    from llm_mcp.modeling.base import checkpoint_dtype, load_base

    path, trc = cfg.model.path, cfg.model.trust_remote_code
    if (q := cfg.quantization) is None:
        return load_base(path, dtype="auto", trust_remote_code=trc)
    return load_base(
        path,
        dtype=checkpoint_dtype(path, trc),
        trust_remote_code=trc,
        quant_type=q.bnb_4bit_quant_type,
        double_quant=q.bnb_4bit_use_double_quant,
    ).dequantize()


def save_merged(spec: dict[str, Any], cfg: JobConfig, merged: Any, out: Path) -> None:
    """A merged model as a transformers checkpoint: weights, tokenizer (the adapter's where it has one) and a
    vision-language model's image processor."""
    from transformers import AutoTokenizer

    merged.save_pretrained(out, safe_serialization=True)
    adapter, base_path = Path(spec["adapter"]), Path(cfg.model.path)
    tok_src = tokenizer_source(adapter, base_path)
    AutoTokenizer.from_pretrained(tok_src, trust_remote_code=cfg.model.trust_remote_code).save_pretrained(out)
    for name in PROCESSOR_FILES:  # a vision-language model's image processor: the merged VLM serves images too
        if (base_path / name).is_file():
            shutil.copy2(base_path / name, out / name)


def main(lock_path: str) -> int:
    """Worker: the format's writer (load, merge, save, convert ...) into a temporary path renamed into place;
    then remove the lock. Stages go to the progress file the waiting call reads."""
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
    progress_file = dest.with_name(f".{dest.name}.progress")

    def progress(stage: str) -> None:
        progress_file.write_text(json.dumps({"stage": stage, "at": time.time()}))

    try:
        from llm_mcp.inference.exports import FORMATS

        tmp.mkdir()
        form = FORMATS[spec["manifest"]["format"]].from_manifest(spec["manifest"])
        report = form.write_background(spec, tmp, progress)
        (tmp / "export.json").write_text(json.dumps(spec["manifest"] | report, indent=2))
        os.rename(tmp, dest)
        return 0
    except Exception as exc:  # reported to the waiting tool call through the error file
        dest.with_name(f".{dest.name}.error").write_text(f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        progress_file.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
