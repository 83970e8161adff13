"""How a training run ends: the probe exports are checked against, its peak memory, and the record of a
failure (its cause in one line, nothing half-written left)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llm_mcp.core.atomic import disk_full, disk_full_cause
from llm_mcp.core.jobdir import write_rank, write_result


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on CPU."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@torch.no_grad()
def save_probe(model, input_ids: list[int], path: Path | None) -> None:
    """The trained model's logits on a short fixed input: exports are checked against them (None: compute only)."""
    from safetensors.torch import save_file

    model.eval()
    ids = torch.tensor([input_ids], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0].float().cpu()
    if path is not None:
        save_file({"input_ids": ids[0].cpu(), "logits": logits.contiguous()}, str(path))


def next_step_for(exc: BaseException) -> str:
    if getattr(exc, "next_step", None):
        return exc.next_step  # type: ignore[attr-defined]
    text = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text:
        return (
            "lower batch_size or max_seq_len, use method='qlora', or enable gradient_checkpointing, then resume_from "
            "this job"
        )
    return "read the last log lines (job_status), fix the cause, then start again or resume_from this job"


def record_failure(job_dir: Path, exc: BaseException) -> None:
    """result.json for a failed job: its cause in one line. A half-written checkpoint is removed first (it also
    frees the room a full disk needs for this file); if even that cannot be written, the supervisor records
    the cause from the log and the disk (llm_mcp.jobs.outcome)."""
    for partial in (job_dir / "checkpoints").glob("step-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    if disk_full(exc):
        error, next_step = disk_full_cause(job_dir), "free disk space, then resume_from this job"
    else:
        error, next_step = f"{type(exc).__name__}: {exc}", next_step_for(exc)
    try:
        write_result(job_dir, {"state": "failed", "error": error, "next_step": next_step})
    except OSError as write_error:
        print(f"[llm_mcp] could not write result.json: {write_error}", file=sys.stderr, flush=True)


def record_rank(acc: Any, job_dir: Path) -> None:
    """Each process of a multi-process job says where it runs (ranks/<rank>.json and a log line): job_status shows
    the nodes and their ranks, and a rank that never records its end is the one that was lost."""
    if acc.num_processes < 2:
        return
    node = os.environ.get("LLM_MCP_NODE") or socket.gethostname()  # set by the cluster executors per node
    node_rank = int(os.environ.get("GROUP_RANK", "0"))  # torchrun's machine rank
    write_rank(
        job_dir,
        acc.process_index,
        {
            "rank": acc.process_index,
            "world_size": acc.num_processes,
            "node": node,
            "node_rank": node_rank,
            "local_rank": acc.local_process_index,
            "pid": os.getpid(),
            "started": round(time.time(), 3),
        },
    )
    print(f"[rank {acc.process_index}/{acc.num_processes}] node {node} (node rank {node_rank}), pid {os.getpid()}")


def record_rank_end(acc: Any, job_dir: Path, step: int, exc: BaseException | None = None) -> None:
    """How this process ended: 'ok', or 'failed' with its own error (read when the job's cause is decided)."""
    if acc is None or acc.num_processes < 2:
        return
    fields: dict[str, Any] = {"ended": "failed" if exc else "ok", "step": step, "ended_at": round(time.time(), 3)}
    if exc is not None:
        fields["error"], fields["next_step"] = f"{type(exc).__name__}: {exc}"[:500], next_step_for(exc)
    try:
        write_rank(job_dir, acc.process_index, fields)
    except OSError:
        pass  # a full disk: the job's result says so
