"""One job's supervisor: `python -m llm_mcp.jobs.supervisor HOME JOB_ID`.

Runs in its own session (process group) so the job survives the server. It starts
`accelerate launch`, becomes the child subreaper so it can wait for every descendant (the
launcher may exit before its workers), records the outcome, then starts the next queued job.
On SIGTERM (cancel_job) the trainer checkpoints and exits; after a grace period the
supervisor SIGKILLs whatever is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from llm_mcp.core.jobdir import write_result
from llm_mcp.core.procs import become_subreaper, signal_descendants, usable_cores
from llm_mcp.core.store import JobStore
from llm_mcp.jobs.fetch import append_metric, fetch_model
from llm_mcp.jobs.local import accelerate_command, job_environment, max_jobs, schedule
from llm_mcp.jobs.outcome import finalize

CANCEL_POLL_S = 2.0
CANCEL_GRACE_S = float(os.environ.get("LLM_MCP_CANCEL_GRACE_S", "60"))
# Training yields the CPU to the MCP server (and the agent's other work): tool calls stay fast while
# a job trains, and an otherwise idle machine still gives the job every cycle.
JOB_NICE = int(os.environ.get("LLM_MCP_JOB_NICE", "10"))


def main(home: str, job_id: str) -> int:
    become_subreaper()
    if JOB_NICE:
        os.nice(JOB_NICE)  # inherited by accelerate and the trainers
    store = JobStore(Path(home))
    # Record who runs the job before anything else: a server that restarts now finds this process by its pid.
    store.update(job_id, pid=os.getpid(), pid_started_at=psutil.Process().create_time())
    job = store.get(job_id)
    job_dir = store.job_dir(job_id)
    if job.cancel_requested:  # cancelled between the claim and this process: never start the trainer
        state = finalize(store, job, None)
        print(f"[supervisor] {job_id} was cancelled before it started: {state}", flush=True)
        schedule(store)
        return 0
    stopping = threading.Event()

    def on_sigterm(signum, frame):
        if stopping.is_set():
            return
        stopping.set()
        print(f"[supervisor] SIGTERM: cancel requested; SIGKILL after {CANCEL_GRACE_S:g} s", flush=True)
        timer = threading.Timer(CANCEL_GRACE_S, signal_descendants)
        timer.daemon = True
        timer.start()

    def watch_cancel():
        """A cancel recorded while no pid was known (or whose signal was lost) still stops the job."""
        while not stopping.wait(CANCEL_POLL_S):
            try:
                requested = store.get(job_id).cancel_requested
            except Exception:  # a busy or full store: look again next time
                continue
            if requested:
                os.killpg(os.getpgrp(), signal.SIGTERM)  # the trainer checkpoints; on_sigterm starts the grace timer
                return

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=watch_cancel, daemon=True).start()
    # LLM_MCP_MAX_JOBS jobs share the machine's cores: each gets its share of threads, never more threads than
    # cores (oversubscribed OpenMP threads spin and slow every job down several-fold)
    env = {**os.environ, **job_environment(job.config, max(1, usable_cores() // max_jobs()), store.home)}
    cmd = accelerate_command(job.config, job_dir)
    exit_code: int | None = 0
    with open(job_dir / "train.log", "ab") as log:
        cause = fetch_first(job.config, job_dir, stopping)
        if cause is not None:
            ended = "cancelled" if stopping.is_set() else "failed"
            resume = "fix the cause, then start the job again (a download continues where it stopped)"
            write_result(job_dir, {"state": ended, "error": cause, "next_step": resume})
            log.write(f"[supervisor] {cause}\n".encode())
        elif not stopping.is_set():
            log.write(f"[supervisor] {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=job_dir, env=env
            )
            exit_code = proc.wait()
        while True:  # wait for every descendant, including workers orphaned by the launcher
            try:
                os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    state = finalize(store, store.get(job_id), exit_code)
    print(f"[supervisor] {job_id} ended {state} (exit code {exit_code}) at {time.strftime('%H:%M:%S')}", flush=True)
    schedule(store)
    return 0


def fetch_first(cfg, job_dir: Path, stopping: threading.Event) -> str | None:
    """The job's hub model into the cache before the launch (llm_mcp.jobs.fetch); a cancel stops the wait at once
    (the partial download stays in the cache and a resume continues it)."""
    outcome: dict[str, str | None] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(cause=fetch_model(cfg, append_metric(job_dir / "metrics.jsonl"))), daemon=True
    )
    worker.start()
    while worker.is_alive() and not stopping.wait(0.5):
        pass
    if worker.is_alive():
        return "cancelled while downloading the model; what was downloaded stays in the Hugging Face cache"
    return outcome.get("cause")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
