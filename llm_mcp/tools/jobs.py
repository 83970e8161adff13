"""job_status and cancel_job, and the jobs://{id}/log and /metrics resources."""

from __future__ import annotations

import base64
import functools
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp_types import CallToolResult, ImageContent, ToolAnnotations
from pydantic import BaseModel, Field

from llm_mcp.core.errors import LlmMcpError
from llm_mcp.core.jobdir import read_metrics
from llm_mcp.core.request import Request
from llm_mcp.core.store import FINAL_STATES, JobStore
from llm_mcp.jobs.records import wait_for_job
from llm_mcp.jobs.status import JobStatus, build_status, summarize_list, summarize_status
from llm_mcp.tools.common import READ_ONLY, add_tool, result, state_of


class JobStatusResult(BaseModel):
    job: JobStatus | None = None
    jobs: list[JobStatus] = Field(default_factory=list, description="Recent jobs, newest first (no job_id given).")


class JobStatusRequest(Request):
    job_id: str | None = Field(None, description="The job; omit to list recent jobs.", max_length=128)
    wait_seconds: float = Field(
        0,
        description="Wait up to this long (0-30 s) for the state to change, with progress notifications meanwhile.",
        ge=0,
        le=30,
    )
    plot: bool = Field(False, description="Also return the loss curve (an evaluation: its scores) as a PNG image.")
    page: int = Field(1, description="An evaluation: which page of its worst-scored rows (10 a page).", ge=1, le=10_000)


class CancelJobRequest(Request):
    job_id: str = Field(description="The job to stop.", max_length=128)


async def job_status(ctx: Context, request: JobStatusRequest) -> Annotated[CallToolResult, JobStatusResult]:
    """Progress of a fine-tuning job: state, step / total, epoch, latest and smoothed train loss,
    eval loss, learning rate, tokens/s, elapsed time and ETA, checkpoints, the adapter path
    when done, the last log lines, warnings, and on failure the cause in one sentence plus the
    next step. Without job_id: recent jobs, newest first, one line each.
    """
    state = state_of(ctx)
    store = state.store  # read-only: the server's job watcher records dead jobs and starts queued ones
    job_id = request.job_id
    if job_id is None:  # the job store and files are read off the event loop: a locked jobs.db stalls only this call
        statuses = await anyio.to_thread.run_sync(_recent, store)
        text = "\n".join([summarize_list(statuses), *(f"note: {n}" for n in store.recovery_notes)])
        return result(text, JobStatusResult(jobs=statuses))
    job = await anyio.to_thread.run_sync(store.get, job_id)
    job = await wait_for_job(store, job, request.wait_seconds, ctx.report_progress, until_change=True)
    status = await anyio.to_thread.run_sync(functools.partial(build_status, store, job, page=request.page))
    answer = result(summarize_status(status), JobStatusResult(job=status))
    if request.plot:
        from llm_mcp.jobs.plot import evaluation_png

        title = f"{job_id}: {job.method} on {job.model}"
        png = (
            await anyio.to_thread.run_sync(evaluation_png, status.evaluation, title)
            if status.evaluation
            else (await anyio.to_thread.run_sync(_loss_png, store, job_id, title))
        )
        answer.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"))
    return answer


def _recent(store: JobStore) -> list[JobStatus]:
    return [build_status(store, j, log_lines=0) for j in store.list(limit=20)]


def _loss_png(store: JobStore, job_id: str, title: str) -> bytes:
    from llm_mcp.jobs.plot import loss_curve_png

    return loss_curve_png(read_metrics(store.job_dir(job_id)), title)


def cancel_job(ctx: Context, request: CancelJobRequest) -> Annotated[CallToolResult, JobStatusResult]:
    """Stop a job. A queued job leaves the queue; a running one is asked to stop (SIGTERM, or on a
    cluster a cancel file and the scheduler's TERM), saves a checkpoint at the next step and ends
    'cancelled' (killed after a grace period). Safe to call twice. Resume later with
    start_finetune(resume_from=job_id).
    """
    state = state_of(ctx)
    job = state.executor_for(state.store.get(request.job_id).engine).cancel(request.job_id)
    status = build_status(state.store, job)
    note = "" if job.state in FINAL_STATES else "\n(stopping: it checkpoints at the next step; poll job_status)"
    return result(summarize_status(status) + note, JobStatusResult(job=status))


def _existing_job_dir(ctx: Context, job_id: str):
    store = state_of(ctx).store
    try:
        return store.job_dir(store.get(job_id).id)
    except LlmMcpError as exc:
        raise ResourceNotFoundError(str(exc)) from None


async def job_log(job_id: str, ctx: Context) -> str:
    state = state_of(ctx)
    await anyio.to_thread.run_sync(_existing_job_dir, ctx, job_id)
    lines = await anyio.to_thread.run_sync(lambda: state.executor.logs(job_id, lines=100_000, max_bytes=256 * 1024))
    return "\n".join(lines)


async def job_metrics(job_id: str, ctx: Context) -> str:
    path = await anyio.to_thread.run_sync(_existing_job_dir, ctx, job_id) / "metrics.jsonl"
    return await anyio.to_thread.run_sync(lambda: path.read_text(encoding="utf-8") if path.exists() else "")


def register(mcp: MCPServer) -> None:
    add_tool(mcp, job_status, JobStatusRequest, "Job status", READ_ONLY)
    add_tool(
        mcp,
        cancel_job,
        CancelJobRequest,
        "Cancel a job",
        ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False),
    )
    mcp.resource(
        "jobs://{job_id}/log", name="job log", mime_type="text/plain", description="A job's training log (last 256 KB)."
    )(job_log)
    mcp.resource(
        "jobs://{job_id}/metrics",
        name="job metrics",
        mime_type="application/x-ndjson",
        description="A job's metrics.jsonl: one JSON object per optimizer step.",
    )(job_metrics)
