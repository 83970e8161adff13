"""evaluate: score the base model, jobs' adapters and checkpoints on a held-out dataset, side by side."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, ImageContent
from pydantic import BaseModel, Field

from llm_mcp.core.store import FINAL_STATES
from llm_mcp.jobs.records import record_job, wait_for_job
from llm_mcp.jobs.status import JobStatus, build_status, summarize_status
from llm_mcp.tools.common import STARTS, add_tool, result, state_of
from llm_mcp.validation.evaluate import resolve_evaluation
from llm_mcp.validation.requests import EvaluateRequest


class EvaluateResult(BaseModel):
    job_id: str = Field(description="The evaluation job (job_status / cancel_job take it).")
    state: str
    evaluation: dict | None = Field(
        None,
        description="Per-target scores once finished: loss, perplexity, "
        "exact_match, contains, regex, preference_accuracy.",
    )
    job: JobStatus
    next_step: str


async def evaluate(ctx: Context, request: EvaluateRequest) -> Annotated[CallToolResult, EvaluateResult]:
    """Did the fine-tune help? Scores the base model and job adapters (final or a checkpoint) on
    the same held-out rows: mean completion loss and perplexity; for rows with a reference answer
    (a prompt_completion row's completion, a conversation's last assistant turn) a greedy
    generation scored by exact match, contains and regex; for preference rows, how often the
    chosen answer is more likely than the rejected one. Runs as a background job (job_status,
    cancel_job); short ones finish within wait_seconds and answer at once. Per-row results are
    saved to a file whose path is in the result.
    """
    state = state_of(ctx)
    config, warnings = await anyio.to_thread.run_sync(lambda: resolve_evaluation(request, state.validation_context()))
    job = await anyio.to_thread.run_sync(
        lambda: state.executor.submit(
            record_job(state.store, state.executor.name, config, config.model.id, None, warnings).id
        )
    )
    job = await wait_for_job(
        state.store,
        job,
        request.wait_seconds,
        ctx.report_progress,
        until_change=False,
        every_s=0.5,
        progress="{step}/{total} rows",
    )
    status = await anyio.to_thread.run_sync(build_status, state.store, job)
    finished = job.state in FINAL_STATES
    answer = EvaluateResult(
        job_id=job.id,
        state=job.state,
        evaluation=status.evaluation,
        job=status,
        next_step="compare the targets above"
        if status.evaluation
        else f"job_status(job_id='{job.id}', wait_seconds=30) until it succeeds",
    )
    out = result(summarize_status(status) + ("" if finished else f"\nnext: {answer.next_step}"), answer)
    if request.plot and status.evaluation:
        from llm_mcp.jobs.plot import evaluation_png

        png = await anyio.to_thread.run_sync(
            evaluation_png, status.evaluation, f"{job.id} on {Path(config.dataset).name}"
        )
        out.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"))
    return out


def register(mcp: MCPServer) -> None:
    add_tool(
        mcp,
        evaluate,
        EvaluateRequest,
        "Evaluate models and adapters",
        STARTS,
    )
