"""The local executor: jobs run on this machine, one supervisor process each.

A job runs as `python -m llm_mcp.jobs.supervisor HOME JOB_ID` in a new session (its own process
group), which runs `accelerate launch ... -m llm_mcp.train.run JOB_DIR`. Jobs therefore outlive
the server that started them. Whoever notices free capacity (a server on start-up or on a tool
call, or a supervisor whose job just ended) starts the oldest queued job; the claim happens in
one BEGIN IMMEDIATE transaction, so no job is ever started twice.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from llm_mcp.core.hardware import detect
from llm_mcp.core.jobconfig import EvalConfig, JobConfig
from llm_mcp.core.jobdir import log_tail
from llm_mcp.core.procs import free_port, threads_per_process
from llm_mcp.core.reward_http import REWARD_URLS_ENV
from llm_mcp.core.settings import data_path
from llm_mcp.core.store import Job, JobStore
from llm_mcp.jobs.outcome import finalize

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60  # a claimed job whose supervisor never registered is failed after this


def max_jobs() -> int:
    """Concurrent jobs per device set (LLM_MCP_MAX_JOBS, default 1)."""
    try:
        return max(1, int(os.environ.get("LLM_MCP_MAX_JOBS", "1")))
    except ValueError:
        return 1


def accelerate_command(
    cfg: JobConfig | EvalConfig,
    job_dir: Path,
    *,
    python: str = sys.executable,
    port: int | str | None = None,
    machine_rank: str = "0",
    main_ip: str = "",
) -> list[str]:
    """The command line for a job's resolved config: `accelerate launch` for training.

    A job over several nodes (cfg.nodes > 1) runs this once per node with that node's `machine_rank` and
    the first node's address as `main_ip`; the cluster executors pass shell variables for both.
    """
    n = cfg.num_processes
    if cfg.task == "evaluate":  # one process, no accelerate: the evaluation runner loads what it scores
        return [python, "-m", cfg.entry, str(job_dir)]
    name = "fsdp.yaml" if cfg.distributed == "fsdp" else "single.yaml" if n == 1 else "ddp.yaml"
    config_file = str(data_path("configs") / "accelerate" / name)
    cmd = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config_file,
        "--num_processes",
        str(n),
        "--main_process_port",
        str(port or free_port()),
    ]
    if cfg.nodes > 1:
        cmd += ["--num_machines", str(cfg.nodes), "--machine_rank", machine_rank, "--main_process_ip", main_ip]
    return cmd + ["-m", cfg.entry, str(job_dir)]


def job_environment(cfg: JobConfig | EvalConfig, cores_per_node: int, home: Path) -> dict[str, str]:
    """The variables every job process gets, wherever it runs: the local supervisor and the cluster executors."""
    per_node = max(1, cfg.num_processes // max(1, cfg.nodes))
    hub = {k: os.environ[k] for k in HUB_SETTINGS if os.environ.get(k)}  # where the job's nodes find the model
    graders = {k: os.environ[k] for k in (REWARD_URLS_ENV,) if os.environ.get(k)}  # GRPO's http graders allowed
    return {
        "LLM_MCP_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "OMP_NUM_THREADS": str(threads_per_process(per_node, cores=cores_per_node)),
        **hub,
        **graders,
    }


# The Hugging Face settings a job needs wherever it runs (Ray starts jobs without the submitter's environment;
# HF_TOKEN is added only where a job is submitted, never written into a script or shown in a dry run).
HUB_SETTINGS = ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE")


def secret_environment() -> dict[str, str]:
    """The token the job downloads gated models with (the server's own HF_TOKEN)."""
    return {k: os.environ[k] for k in ("HF_TOKEN",) if os.environ.get(k)}


def _process_alive(pid: int | None, started_at: float | None) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if started_at and abs(proc.create_time() - started_at) > 2:
            return False  # the pid was reused by another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def schedule(store: JobStore) -> list[str]:
    """Start queued jobs while their device set has capacity. Returns the ids started."""
    limit = max_jobs()
    claimed: list[str] = []
    with store.transaction() as db:
        running: dict[str, int] = {}
        for row in db.execute(
            "SELECT device_set, COUNT(*) AS n FROM jobs WHERE state = 'running' AND engine = 'local' "
            "GROUP BY device_set"
        ):
            running[row["device_set"]] = row["n"]
        for row in db.execute(
            "SELECT id, device_set FROM jobs WHERE state = 'queued' AND engine = 'local' ORDER BY created_at"
        ).fetchall():
            if running.get(row["device_set"], 0) < limit:
                db.execute(
                    "UPDATE jobs SET state = 'running', started_at = ? WHERE id = ? AND state = 'queued'",
                    (time.time(), row["id"]),
                )
                running[row["device_set"]] = running.get(row["device_set"], 0) + 1
                claimed.append(row["id"])
    for job_id in claimed:
        _spawn_supervisor(store, job_id)
    return claimed


def _spawn_supervisor(store: JobStore, job_id: str) -> None:
    job_dir = store.job_dir(job_id)
    try:
        with open(job_dir / "supervisor.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llm_mcp.jobs.supervisor", str(store.home), job_id],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=job_dir,
                close_fds=True,
            )
    except OSError as exc:
        store.update(
            job_id,
            expect=("running",),
            state="failed",
            finished_at=time.time(),
            error=f"could not start the job process: {exc}",
            next_step="check disk space and permissions",
        )
        return
    store.update(job_id, pid=proc.pid, pid_started_at=psutil.Process(proc.pid).create_time())


def kill_job_processes(job_dir: Path, sig: int = signal.SIGKILL) -> int:
    """Signal any process still running this job's trainer (orphans of a dead supervisor)."""
    needle, n = str(job_dir), 0
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if ("llm_mcp.train.run" in cmd or "llm_mcp.inference.evaluate" in cmd) and needle in cmd:
            try:
                proc.send_signal(sig)
                n += 1
            except psutil.Error:
                pass
    return n


def _supervisor_of(job_id: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "llm_mcp.jobs.supervisor" in cmd and job_id in cmd:
            return proc
    return None


def reconcile(store: JobStore) -> None:
    """Mark running jobs whose processes are gone as failed (with the cause); then start queued ones.

    One job whose files cannot be made sense of is failed with that cause; it never stops the others or the queue.
    """
    now = time.time()
    for job in store.list(limit=1000, states=("running",), engine="local"):
        try:
            _reconcile_one(store, job, now)
        except Exception as exc:  # contained: this job fails with the cause, the queue goes on
            log.warning("job %s: %s", job.id, exc)
            store.update(
                job.id,
                expect=("running",),
                state="failed",
                finished_at=now,
                error=f"could not record how the job ended ({type(exc).__name__}: {exc})",
                next_step="read its log (job_status) and start it again",
            )
    schedule(store)


def _reconcile_one(store: JobStore, job: Job, now: float) -> None:
    if job.pid is None:
        live = _supervisor_of(job.id)
        if live is not None:  # spawned, but the server died before recording its pid: adopt it
            store.update(job.id, expect=("running",), pid=live.pid, pid_started_at=live.create_time())
        elif job.started_at and now - job.started_at > START_TIMEOUT_S:
            store.update(
                job.id,
                expect=("running",),
                state="failed",
                finished_at=now,
                error="the job was claimed but its process never started",
                next_step="start it again",
            )
        return
    if not _process_alive(job.pid, job.pid_started_at):
        kill_job_processes(store.job_dir(job.id))
        finalize(store, job, None)


def cancel(store: JobStore, job_id: str) -> Job:
    """Cancel: a queued job leaves the queue; a running one gets SIGTERM (checkpoint, then exit).

    Idempotent: cancelling a finished job changes nothing.
    """
    job = store.get(job_id)
    if job.state == "queued" and store.update(
        job_id, expect=("queued",), state="cancelled", finished_at=time.time(), cancel_requested=1
    ):
        return store.get(job_id)
    if job.state == "running":
        store.update(job_id, cancel_requested=1)
        if job.pid and _process_alive(job.pid, job.pid_started_at):
            try:
                os.killpg(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return store.get(job_id)


class LocalExecutor:
    """Jobs as local processes (`python -m llm_mcp.jobs.supervisor`), LLM_MCP_MAX_JOBS at a time per device set."""

    name = "local"

    def __init__(self, store: JobStore):
        self.store = store

    def submit(self, job_id: str) -> Job:
        schedule(self.store)
        return self.store.get(job_id)

    def poll(self) -> None:
        reconcile(self.store)

    def cancel(self, job_id: str) -> Job:
        return cancel(self.store, job_id)

    def logs(self, job_id: str, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
        return log_tail(self.store.job_dir(job_id), lines=lines, max_bytes=max_bytes)

    def hardware(self):
        return detect()

    def describe_submission(self, job_id, cfg, job_dir) -> None:
        return None

    def home_warning(self) -> None:
        return None

    def reattach(self) -> None:
        # Supervisors outlive servers and record their own outcome: re-attaching is reconciling
        # the jobs whose supervisor died with them, then starting what is queued.
        reconcile(self.store)
