"""How a job ended: the state, cause and next step recorded once its processes are gone (every executor)."""

from __future__ import annotations

import re
import signal
import statistics
import time
from pathlib import Path

from llm_mcp.core import throughput
from llm_mcp.core.atomic import DISK_FULL, disk_full_cause, free_mb
from llm_mcp.core.jobdir import checkpoints, log_tail, read_metrics, read_ranks, read_result
from llm_mcp.core.store import FINAL_STATES, Job, JobStore
from llm_mcp.core.throughput import device_kind


def describe_exit(exit_code: int | None, tail: list[str], job_dir: Path | None = None) -> str:
    """One sentence on why the process ended, from its exit status and log."""
    if job_dir is not None and (any(DISK_FULL.search(line) for line in tail) or free_mb(job_dir) < 1):
        return disk_full_cause(job_dir)
    for line in reversed(tail):
        m = re.search(r"Signals\.(SIG[A-Z]+)", line)
        if m:
            return f"the training process was killed by {m.group(1)}" + (
                " (often the out-of-memory killer)" if m.group(1) == "SIGKILL" else ""
            )
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.Signals._value2member_map_ else str(-exit_code)
        return f"the job process was killed by {name}"
    errors = [
        ln
        for ln in tail
        if re.match(r"^\w*(Error|Exception)\b", ln.strip()) and "Traceback (most recent call last)" not in ln
    ]
    if errors:
        return f"the training process failed: {errors[-1].strip()}"
    if exit_code is None:
        return "the job's supervisor process disappeared (machine restart or kill -9) before recording an exit status"
    return f"the training process exited with code {exit_code}"


# What a process says when another rank went away under it (gloo, TCPStore, NCCL): not a cause of its own.
PEER_GONE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|connection refused|remote (process|worker|peer)|"
    r"DistNetworkError|communicator was aborted",
    re.I,
)


def rank_cause(job_dir: Path) -> tuple[str, str | None] | None:
    """For a job of several processes that failed: (the rank and node that caused it, its next step), or None.

    A rank other than 0 that failed with an error of its own is the cause (rank 0's own error is already the
    job's result). Otherwise, when some rank recorded its end, a rank that did not lost its process or node
    without a word; the others' "connection closed by peer" errors are only echoes. When no rank recorded an
    end, everything was stopped at once (scancel, ray job stop, a dead supervisor): None, the engine's word or
    the exit status says more.
    """
    ranks = read_ranks(job_dir)
    if len(ranks) < 2:
        return None
    own = [r for r in ranks if r.get("ended") == "failed" and not PEER_GONE.search(r.get("error", ""))]
    if any(r["rank"] == 0 for r in own):
        return None
    if own:
        first = own[0]  # read_ranks sorts by rank
        return f"rank {first['rank']} on node {first.get('node')} failed: {first['error']}", first.get("next_step")
    lost = [r for r in ranks if "ended" not in r]
    if not lost or len(lost) == len(ranks):
        return None
    by_node: dict[str, list[str]] = {}
    for r in lost:
        by_node.setdefault(str(r.get("node")), []).append(str(r["rank"]))
    who = " and ".join(
        f"{'ranks' if len(rs) > 1 else 'rank'} {', '.join(rs)} on node {node}" for node, rs in by_node.items()
    )
    steps = [m["step"] for m in read_metrics(job_dir) if "loss" in m and "step" in m]
    ckpt = checkpoints(job_dir)
    cause = (
        f"{who} ended without a word during step {(max(steps) if steps else 0) + 1} (killed: kill -9 or the "
        "out-of-memory killer, or the node was lost); the last checkpoint is "
        + (f"step {ckpt[-1][0]}" if ckpt else "none")
    )
    return cause, None


def finalize(store: JobStore, job: Job, exit_code: int | None, outside: str | None = None) -> str:
    """Record the final state of a job whose processes have ended. Returns the state.

    `outside`: what the engine says ended the job when this server did not (a scancel, `ray job stop`, a
    time limit, a lost node). The job then ends failed with that cause even if the trainer checkpointed on
    the way out, because nobody here asked it to stop; the next step says how to resume.
    """
    job_dir = store.job_dir(job.id)
    result = read_result(job_dir)
    malformed = result.get("malformed") if result else None
    tail = log_tail(job_dir)
    fresh = store.get(job.id)
    if result and result.get("state") in FINAL_STATES:
        state, error, next_step = result["state"], result.get("error"), result.get("next_step")
        if state == "cancelled" and not fresh.cancel_requested:  # the trainer got a stop nobody here sent
            cause = (
                outside or "stopped by a signal cancel_job did not send (a time limit, preemption, an administrator)"
            )
            state, error = "failed", f"{cause}; the trainer stopped with a checkpoint at step {result.get('step')}"
            next_step = None
    elif fresh.cancel_requested:
        state, error, next_step = "cancelled", None, None
    else:
        state, error = "failed", outside or describe_exit(exit_code, tail, job_dir)
        if malformed:
            error += f" (its {malformed})"
        next_step = (
            f"resume_from='{job.id}' continues from the last checkpoint"
            if checkpoints(job_dir)
            else ("fix the cause shown in the last log lines, then start the job again")
        )
    if state == "failed" and (blamed := rank_cause(job_dir)):
        error, next_step = blamed[0] + (f"; {outside}" if outside else ""), blamed[1]  # None: resume, below
    if state == "failed" and (outside or not next_step) and checkpoints(job_dir):
        next_step = f"resume_from='{job.id}' continues from the last checkpoint"
    if state == "failed" and error and not next_step:
        next_step = "fix the cause shown in the last log lines, then start again or resume"
    if state == "cancelled":
        next_step = f"resume_from='{job.id}' continues from the last checkpoint" if checkpoints(job_dir) else None
    store.update(
        job.id,
        expect=("queued", "running"),
        state=state,
        finished_at=time.time(),
        exit_code=exit_code,
        error=error,
        next_step=next_step,
    )
    if state == "succeeded" and job.engine == "local" and job.config.task == "train" and fresh.started_at:
        learn_time(store.home, job_dir, time.time() - fresh.started_at)
    return state


def learn_time(home: Path, job_dir: Path, wall_s: float) -> None:
    """Record how long this job took to start and to step (llm_mcp.core.throughput), for later dry runs."""
    from llm_mcp.core.hardware import detect

    metrics = read_metrics(job_dir)
    start = next((m for m in metrics if m.get("event") == "start"), None)
    steps = [m for m in metrics if "step_time_s" in m and "tokens" in m]
    if start is None or len(steps) < 3 or not start.get("params"):
        return
    step_s = statistics.median(m["step_time_s"] for m in steps[1:])  # the first step warms up
    work = start["params"] * statistics.median(m["tokens"] for m in steps)
    hw = detect()
    kind = device_kind(start.get("device", "cpu"), hw.gpus[0].name if hw.gpus else "", hw.cpu_count)
    throughput.record(home, kind, wall_s - sum(m["step_time_s"] for m in steps), step_s, work)
