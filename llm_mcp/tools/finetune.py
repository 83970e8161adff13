"""start_finetune: validate the typed request into a job config, record the job, hand it to the executor."""

from __future__ import annotations

import shlex
from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult
from pydantic import BaseModel, Field

from llm_mcp.core.errors import InvalidArgumentError, LlmMcpError
from llm_mcp.core.objectives import get_objective
from llm_mcp.core.request import Request
from llm_mcp.core.rollouts import MAX_PENDING, scores_path, submit
from llm_mcp.core.store import FINAL_STATES
from llm_mcp.jobs.records import record_job
from llm_mcp.tools.common import STARTS, add_tool, result, state_of
from llm_mcp.validation.finetune import resolve_finetune
from llm_mcp.validation.requests import FinetuneRequest


class StartFinetuneResult(BaseModel):
    job_id: str | None = Field(None, description="None for a dry run.")
    state: str = Field(description="queued | running, or 'dry_run'.")
    dry_run: bool
    config: dict = Field(description="The resolved configuration the job trains with.")
    estimates: dict = Field(description="Trainable params, memory, steps, tokens and a rough time.")
    warnings: list[str]
    next_step: str
    submission: dict | None = Field(
        None, description="Dry runs on a cluster: the exact batch script or Ray job it would submit."
    )


def start_finetune(ctx: Context, request: FinetuneRequest) -> Annotated[CallToolResult, StartFinetuneResult]:
    """Start a fine-tuning job in the background and return its job id at once.

    Validates everything first and reports every problem together: the model (with close
    names), the method's status for it (unsupported is refused with the methods that work;
    experimental is allowed with a warning), hyperparameter ranges, the dataset (format,
    bad rows with line numbers) and whether the estimated memory fits this machine (else
    which method / batch / length would). dry_run=true returns the resolved config and
    estimates (trainable params, memory, steps, tokens, rough time) without starting.
    The job runs under `accelerate launch`, outlives this server, checkpoints as it goes,
    and writes a PEFT adapter. Follow it with job_status(job_id, wait_seconds=30).
    """
    state = state_of(ctx)
    resolved = resolve_finetune(request, state.validation_context())
    if not request.dry_run:
        return _start(state, request, resolved)
    submission = state.executor.describe_submission("<job_id>", resolved.config, state.store.jobs_dir / "<job_id>")
    answer = StartFinetuneResult(
        state="dry_run",
        dry_run=True,
        config=resolved.config.model_dump(mode="json"),
        estimates=resolved.estimates,
        warnings=resolved.warnings,
        submission=submission,
        next_step="call start_finetune again without dry_run to start it",
    )
    return result(summarize(answer), answer)


def _start(state, request: FinetuneRequest, resolved) -> CallToolResult:
    job = record_job(
        state.store,
        state.executor.name,
        resolved.config,
        resolved.entry.id,
        request.name,
        resolved.warnings,
        request.resume_from,
    )
    job = state.executor.submit(job.id)
    answer = StartFinetuneResult(
        job_id=job.id,
        state=job.state,
        dry_run=False,
        config=job.config.model_dump(mode="json"),
        estimates=resolved.estimates,
        warnings=resolved.warnings,
        next_step=f"job_status(job_id='{job.id}', wait_seconds=30) until it succeeds",
    )
    return result(summarize(answer), answer)


def summarize(r: StartFinetuneResult) -> str:
    c, e = r.config, r.estimates
    about = get_objective(c.get("objective")).describe(c)
    about = (f" {about}" if about else "") + (f" from {c['init_from']}'s adapter" if c.get("init_from") else "")
    lines = [
        ("DRY RUN (nothing started): " if r.dry_run else f"Started job {r.job_id} ({r.state}): ")
        + f"{c['method']}{about} on {c['model']['id']}, lr {c['learning_rate']:g}, rank {c['lora']['rank']}, "
        f"batch {c['batch_size']}x{c['gradient_accumulation']}x{c['num_processes']}, max_seq_len {c['max_seq_len']}.",
        f"{e['train_rows']} training rows ({e['eval_rows']} eval), {e['total_steps']} steps, "
        f"~{e['approx_tokens']:,} tokens; {e['trainable_params']:,} trainable params; memory ~{e['memory_gb']:g} GB "
        f"of {e['usable_memory_gb']:g} GB usable; rough time {e['rough_time_s']:.0f} s.",
    ]
    lines += [f"warning: {w}" for w in r.warnings]
    sub = r.submission
    if sub and sub.get("kind") == "sbatch":
        lines.append(f"would run `{shlex.join(sub['command'])}` with this script:\n{sub['script']}")
    elif sub:
        lines.append(
            f"would submit to Ray at {sub['address']}: {sub['entrypoint']} "
            f"(CPUs {sub['entrypoint_num_cpus']}, GPUs {sub['entrypoint_num_gpus']})"
        )
    lines.append(f"next: {r.next_step}")
    return "\n".join(lines)


class SubmitRewardsRequest(Request):
    job_id: str = Field(description="The GRPO job waiting for the agent's scores.", max_length=128)
    step: int = Field(description="The step job_status's pending_rollouts names.", ge=1, le=1_000_000)
    scores: list[float] = Field(
        description="One score per pending completion, in index order (higher is better; the job normalises them "
        "within each prompt's group).",
        max_length=MAX_PENDING,
    )


class SubmitRewardsResult(BaseModel):
    job_id: str
    step: int
    resumed_job_id: str | None = Field(None, description="A job that had paused waiting: the job that resumes it.")
    next_step: str


def submit_rewards(ctx: Context, request: SubmitRewardsRequest) -> Annotated[CallToolResult, SubmitRewardsResult]:
    """Score a GRPO job's pending completions (the agent grader): one number per completion that
    job_status lists under pending_rollouts, in index order. A running job takes them and trains on;
    a job that paused after waiting too long resumes from its checkpoint as a new job (its id is returned).
    """
    state = state_of(ctx)
    job = state.store.get(request.job_id)
    try:
        new = submit(state.store.job_dir(job.id), request.step, request.scores)
    except ValueError as exc:
        raise InvalidArgumentError(
            [f"{exc}\nCheck job_status(job_id='{job.id}') and call submit_rewards again."]
        ) from None
    if not new:
        answer = SubmitRewardsResult(
            job_id=job.id, step=request.step, next_step=f"job_status(job_id='{job.id}') shows the next pending step"
        )
        return result(f"Scores for step {request.step} of {job.id} were already in; the first ones stand.", answer)
    if job.state not in FINAL_STATES:
        answer = SubmitRewardsResult(
            job_id=job.id, step=request.step, next_step=f"job_status(job_id='{job.id}', wait_seconds=30)"
        )
        return result(f"Scores for step {request.step} of {job.id} recorded; it trains on.", answer)
    try:
        resume = FinetuneRequest.parse({**job.training.request, "resume_from": job.id}, "submit_rewards")
        started = _start(state, resume, resolve_finetune(resume, state.validation_context()))
    except LlmMcpError:
        scores_path(state.store.job_dir(job.id), request.step).unlink(missing_ok=True)  # a retry may resume it
        raise
    new_id = started.structured_content["job_id"] if started.structured_content else None
    answer = SubmitRewardsResult(
        job_id=job.id,
        step=request.step,
        resumed_job_id=new_id,
        next_step=f"job_status(job_id='{new_id}', wait_seconds=30)",
    )
    return result(f"Scores for step {request.step} recorded; {job.id} had paused, {new_id} resumes it.", answer)


def register(mcp: MCPServer) -> None:
    add_tool(mcp, start_finetune, FinetuneRequest, "Start a fine-tune", STARTS)
    add_tool(mcp, submit_rewards, SubmitRewardsRequest, "Score GRPO completions", STARTS)
