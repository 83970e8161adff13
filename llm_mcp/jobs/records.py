"""Job bookkeeping the tools share: recording a new job (directory, config.json, store row: all or nothing)
and waiting on one with progress reports."""

from __future__ import annotations

import functools
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable

import anyio

from llm_mcp.core.jobconfig import EvalConfig, JobConfig
from llm_mcp.core.store import FINAL_STATES, Job, JobStore, new_job_id
from llm_mcp.jobs.status import build_status

Report = Callable[[float, float | None, str], Awaitable[None]]


def record_job(
    store: JobStore,
    engine: str,
    config: JobConfig | EvalConfig,
    model_id: str,
    name: str | None,
    warnings: list[str],
    resume_from: str | None = None,
) -> Job:
    """Write the job's directory and config.json, then its queued record: all of it, or nothing."""
    job_id = new_job_id()
    config = config.model_copy(update={"job_id": job_id})
    job = Job(
        id=job_id,
        name=name or job_id,
        state="queued",
        model=model_id,
        method=config.method,
        device_set=config.device,
        created_at=time.time(),
        config=config,
        resumed_from=resume_from,
        warnings=warnings,
        engine=engine,
    )
    job_dir = store.job_dir(job_id)
    try:
        job_dir.mkdir(parents=True)
        config.write(job_dir)
        store.insert(job)
    except (OSError, sqlite3.Error):
        shutil.rmtree(job_dir, ignore_errors=True)  # no half-created job: no row, no directory
        raise
    return job


async def wait_for_job(
    store: JobStore,
    job: Job,
    wait_seconds: float,
    report: Report,
    *,
    until_change: bool,
    every_s: float = 1.0,
    progress: str = "step {step}/{total}",
) -> Job:
    """Poll `job` for up to wait_seconds, reporting progress each time, until it ends (or, with until_change,
    until its state changes). Returns its latest record."""
    deadline = anyio.current_time() + wait_seconds
    first_state = job.state
    while job.state not in FINAL_STATES and anyio.current_time() < deadline:
        status = await anyio.to_thread.run_sync(functools.partial(build_status, store, job, log_lines=0))
        await report(
            status.step,
            status.total_steps,
            f"{job.state}: " + progress.format(step=status.step, total=status.total_steps or "?"),
        )
        await anyio.sleep(min(every_s, max(0.0, deadline - anyio.current_time())))
        job = await anyio.to_thread.run_sync(store.get, job.id)
        if until_change and job.state != first_state:
            break
    return job
