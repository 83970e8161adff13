"""start_finetune: validate a request into a job config, record the job, hand it to the executor."""

from __future__ import annotations

import inspect
import logging
import shutil
import sqlite3
import time
from typing import TYPE_CHECKING, Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field

from llm_mcp.core.errors import ConfigurationError, InvalidArgumentError
from llm_mcp.core.jobconfig import SchedulerSettings
from llm_mcp.core.store import Job, new_job_id
from llm_mcp.core.validate import Resolved, resolve_finetune
from llm_mcp.tools.common import add_tool, choice, result, state_of, summarize_start
from llm_mcp.tools.models import MethodName

if TYPE_CHECKING:
    from llm_mcp.tools.services import AppState

log = logging.getLogger(__name__)


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


def start_finetune(
    ctx: Context,
    model: Annotated[
        str,
        Field(
            description="Matrix id / alias, or a local checkpoint directory (list_models shows "
            "both; relative paths are under LLM_MCP_HOME).",
            max_length=4096,
        ),
    ],
    method: Annotated[
        MethodName,
        Field(description="lora | qlora | dora (Weight-Decomposed LoRA) | sparse (sparse delta, RigL mask updates)."),
    ],
    dataset: Annotated[
        str,
        Field(
            description="JSONL / JSON / CSV / Parquet file or a save_to_disk directory; rows "
            "with 'messages', 'prompt'+'completion' or 'text' (objective='dpo': "
            "'prompt'+'chosen'+'rejected'). Relative paths are under "
            "LLM_MCP_HOME (datasets lists them; save_dataset writes one).",
            max_length=4096,
        ),
    ],
    objective: Annotated[
        choice("causal_lm", "dpo") | None,
        Field(
            description=(
                "causal_lm (default): supervised fine-tuning. dpo: preference tuning (Direct Preference Optimization) on "
                "rows {prompt, chosen, rejected}; the reference is the starting model (the base, or init_from's); "
                "default learning rate 1/40 of the LoRA one."
            )
        ),
    ] = None,
    beta: Annotated[
        float | None, Field(description="dpo: how far the model may move from the reference (0.1).")
    ] = None,
    label_smoothing: Annotated[float | None, Field(description="dpo: assumed share of wrong labels (0-0.49).")] = None,
    init_from: Annotated[
        str | None,
        Field(
            description="Train further from this succeeded job's adapter (e.g. SFT "
            "before dpo); same model and adapter kind.",
            max_length=64,
        ),
    ] = None,
    eval_dataset: Annotated[str | None, Field(description="Held-out data for eval loss (same formats).")] = None,
    eval_fraction: Annotated[
        float | None, Field(description="Hold out this fraction of dataset instead (0-0.5).")
    ] = None,
    max_steps: Annotated[int | None, Field(description="Optimizer steps (1-1e6). Give this or epochs.")] = None,
    epochs: Annotated[float | None, Field(description="Passes over the data (default 1).")] = None,
    learning_rate: Annotated[float | None, Field(description="Default: the model's recommended LoRA LR.")] = None,
    lora_rank: Annotated[int | None, Field(description="Adapter rank (default 32; 1-1024).")] = None,
    lora_alpha: Annotated[float | None, Field(description="Scaling numerator (default = rank).")] = None,
    lora_dropout: Annotated[float | None, Field(description="Dropout on the adapter input (0-0.9).")] = None,
    target_modules: Annotated[
        list[str] | None, Field(description="Module names to adapt (default: the model's all-linear list).")
    ] = None,
    train_experts: Annotated[
        bool | None,
        Field(description="MoE models: LoRA / QLoRA also adapt the experts (default true; needs lora_dropout 0)."),
    ] = None,
    batch_size: Annotated[int | None, Field(description="Sequences per micro-batch per process (default 4).")] = None,
    gradient_accumulation: Annotated[
        int | None, Field(description="Micro-batches per optimizer step (default 1).")
    ] = None,
    max_seq_len: Annotated[
        int | None, Field(description="Longer sequences are truncated, and counted in the log (default 1024).")
    ] = None,
    train_on: Annotated[
        choice("completion", "all") | None,
        Field(description="Loss on assistant / completion tokens only (default) or on all tokens."),
    ] = None,
    seed: Annotated[int | None, Field(description="Seed for init, data order and dropout (default 0).")] = None,
    name: Annotated[str | None, Field(description="A label for the job.")] = None,
    num_processes: Annotated[
        int | None, Field(description="Data-parallel processes in all nodes (default 1, or 1 per GPU with nodes).")
    ] = None,
    nodes: Annotated[int | None, Field(description="Machines to spread them over (slurm executor; default 1).")] = None,
    scheduler: Annotated[
        SchedulerSettings | None,
        Field(description="slurm executor: this job's sbatch options (default: LLM_MCP_SLURM_*)."),
    ] = None,
    checkpoint_every: Annotated[
        int | None, Field(description="Checkpoint every N steps (default 50; 0 = only on cancel).")
    ] = None,
    keep_checkpoints: Annotated[
        int | None, Field(description="How many recent checkpoints to keep (default 3).")
    ] = None,
    eval_every: Annotated[int | None, Field(description="Eval loss every N steps (default: only at the end).")] = None,
    lr_scheduler: Annotated[
        choice("cosine", "linear", "constant", "constant_with_warmup") | None,
        Field(description="cosine (default) | linear | constant | constant_with_warmup."),
    ] = None,
    warmup_ratio: Annotated[float | None, Field(description="Fraction of steps warming up (default 0.03).")] = None,
    gradient_checkpointing: Annotated[bool | None, Field(description="Default: on when memory is tight.")] = None,
    group_by_length: Annotated[
        bool | None, Field(description="Batch sequences of similar length together (less padding; default true).")
    ] = None,
    density: Annotated[
        float | None,
        Field(description="sparse: fraction of each target matrix trained (default: LoRA rank 32's parameter count)."),
    ] = None,
    sparsity_ratio: Annotated[
        float | None,
        Field(description="sparse: fraction NOT trained (= 1 - density), as in the 'Supported LLM Models' config."),
    ] = None,
    sparsity_type: Annotated[str | None, Field(description="sparse: only 'unstructured'.")] = None,
    mask_update_interval: Annotated[
        int | None, Field(description="sparse: steps between RigL mask updates (default 100).")
    ] = None,
    mask_update_fraction: Annotated[
        float | None,
        Field(description="sparse: fraction of entries dropped and regrown per update, cosine-decayed (0.3)."),
    ] = None,
    use_rigl: Annotated[
        bool | None, Field(description="sparse: dynamic mask (default true); false = fixed random mask (SHiRA).")
    ] = None,
    quantize_base: Annotated[bool | None, Field(description="sparse: train the delta over a 4-bit NF4 base.")] = None,
    resume_from: Annotated[
        str | None,
        Field(
            description="Continue this failed or cancelled job from its last "
            "checkpoint (a new job; model, method and data as "
            "before)."
        ),
    ] = None,
    dry_run: Annotated[bool, Field(description="Validate and estimate only; start nothing.")] = False,
) -> Annotated[CallToolResult, StartFinetuneResult]:
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
    args = {
        k: v
        for k, v in locals().items()
        if k in inspect.signature(start_finetune).parameters and k not in ("ctx", "dry_run")
    }
    if scheduler is not None:
        args["scheduler"] = scheduler.model_dump(exclude_none=True)
    resolved = _resolve(state, args)
    if dry_run:
        return _dry_run(state, resolved)
    _check_queue(state)
    job = _record_job(state, resolved, name, resume_from)
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
    return result(summarize_start(answer), answer)


def _resolve(state: AppState, args: dict) -> Resolved:
    """Validate against the executor's hardware, count tokens, and warn about an unshared LLM_MCP_HOME."""
    try:
        state.executor.poll()  # fresh queue counts and resume sources; the job watcher does this too
    except ConfigurationError as exc:
        log.warning("polling the %s executor: %s", state.executor.name, exc)
    resolved = resolve_finetune(
        matrix=state.matrix,
        settings=state.settings,
        defaults=state.defaults,
        hardware=state.hardware(),
        store=state.store,
        args=args,
    )
    _check_tokens(resolved)
    if (shared := state.executor.home_warning()) is not None:
        resolved.warnings.append(shared)
    return resolved


def _check_queue(state: AppState) -> None:
    queued = state.store.count(("queued",))
    if queued >= state.settings.max_queued:
        raise InvalidArgumentError(
            f"{queued} jobs are already queued (the limit is LLM_MCP_MAX_QUEUED={state.settings.max_queued}); "
            "wait for some to finish (job_status()) or cancel_job the ones you no longer need, then call again"
        )


def _dry_run(state: AppState, resolved: Resolved) -> CallToolResult:
    """The resolved config, estimates and, on a cluster, the exact submission; nothing is started."""
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
    return result(summarize_start(answer), answer)


def _check_tokens(resolved: Resolved) -> None:
    """Encode the rows as the trainer will: truncations and drops become warnings, token counts estimates."""
    from llm_mcp.train.preview import job_token_report

    report = job_token_report(resolved.config)
    if report is None:
        resolved.estimates["tokens"] = "not counted: the tokenizer is not available locally"
        return
    resolved.warnings += report.warnings()
    resolved.estimates["tokens"] = {
        "rows_examined": report.rows_examined,
        "complete": report.complete,
        "total": report.tokens,
        "trained": report.trained_tokens,
        "longest": report.longest,
        "truncated": report.truncated,
        "dropped": report.dropped,
    }


def _record_job(state: AppState, resolved: Resolved, name: str | None, resume_from: str | None) -> Job:
    return record_job(state, resolved.config, resolved.entry.id, name, resolved.warnings, resume_from)


def record_job(
    state: AppState, config, model_id: str, name: str | None, warnings: list[str], resume_from: str | None = None
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
        engine=state.executor.name,
    )
    job_dir = state.store.job_dir(job_id)
    try:
        job_dir.mkdir(parents=True)
        config.write(job_dir)
        state.store.insert(job)
    except (OSError, sqlite3.Error):
        shutil.rmtree(job_dir, ignore_errors=True)  # no half-created job: no row, no directory
        raise
    return job


def register(mcp: MCPServer) -> None:
    add_tool(
        mcp,
        start_finetune,
        "Start a fine-tune",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False),
    )
