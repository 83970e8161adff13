"""start_finetune: validate the typed request into a job config, record the job, hand it to the executor."""

from __future__ import annotations

import shlex
from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult
from pydantic import BaseModel, Field

from llm_mcp.core.objectives import get_objective
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
    if request.dry_run:
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


def register(mcp: MCPServer) -> None:
    add_tool(mcp, start_finetune, FinetuneRequest, "Start a fine-tune", STARTS)
