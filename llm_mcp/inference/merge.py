"""Background exports (merged, gguf): the lock one detached worker per destination holds, and the tool call's
wait for it. The worker itself is llm_mcp.inference.exports.worker:

    python -m llm_mcp.inference.exports.worker LOCK_FILE

The lock is created exclusively and names its owner (the worker), so two callers never merge into
one destination and a killed worker leaves a stale lock that the next call takes over.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import psutil

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.procs import detached, end_tree
from llm_mcp.core.store import Job
from llm_mcp.inference.card import list_files

MERGE_WAIT_S = 25  # tool calls must answer within 30 s; a longer merge returns state "running"


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
        detached("llm_mcp.inference.exports.worker", str(lock), dest.with_name(f".{dest.name}.log"), append=True)
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
        result.notes.append(f"{_stage(dest)}; call export_adapter again with the same arguments")
        return result
    result.files = list_files(dest)
    return result


def _stage(dest: Path) -> str:
    """Where the worker writing `dest` is, and since when."""
    try:
        at = json.loads(dest.with_name(f".{dest.name}.progress").read_text())
    except (OSError, ValueError):
        return "the export is still being written"
    return f"still running: {at['stage']} (for {time.time() - at['at']:.0f} s)"


def cancel(dest: Path) -> bool:
    """Stop the worker writing `dest` (and its children: the converter) and remove what it wrote; False when
    none is running. Its lock goes last, so no second worker starts on a half-removed export."""
    lock = dest.with_name(f".{dest.name}.lock")
    try:
        owner = json.loads(lock.read_text()).get("owner")
    except (OSError, ValueError):
        return False
    if owner and not _stale(lock):
        end_tree(owner["pid"])
    for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    dest.with_name(f".{dest.name}.progress").unlink(missing_ok=True)
    lock.unlink(missing_ok=True)
    return True


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
