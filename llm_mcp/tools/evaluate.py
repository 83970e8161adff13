"""evaluate: score the base model, jobs' adapters and checkpoints on a held-out dataset, side by side."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, ImageContent, ToolAnnotations
from pydantic import BaseModel, Field

from llm_mcp.core.data import fingerprint, validate_dataset
from llm_mcp.core.errors import InvalidArgumentError, LlmMcpError
from llm_mcp.core.jobconfig import EvalConfig, EvalTarget
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.store import FINAL_STATES
from llm_mcp.jobs.status import JobStatus, build_status, summarize_status
from llm_mcp.tools.common import add_tool, result, state_of
from llm_mcp.tools.finetune import record_job
from llm_mcp.tools.jobs import wait_for_job

if TYPE_CHECKING:
    from llm_mcp.tools.services import AppState


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


async def evaluate(
    ctx: Context,
    targets: Annotated[
        list[str],
        Field(
            description="What to score, side by side (1-8): 'base' (the base model), a job id (its final adapter), "
            "or 'JOB_ID@STEP' / 'JOB_ID@latest' (a checkpoint). All must share one base model.",
            min_length=1,
            max_length=8,
        ),
    ],
    dataset: Annotated[
        str,
        Field(
            description="Held-out rows (JSONL / JSON / CSV / Parquet; relative paths are "
            "under LLM_MCP_HOME): SFT rows get loss / perplexity and, with a "
            "reference answer, exact_match / contains / regex; preference rows "
            "get preference accuracy.",
            max_length=4096,
        ),
    ],
    model: Annotated[
        str | None, Field(description="The base model when targets is only ['base'].", max_length=4096)
    ] = None,
    max_rows: Annotated[int, Field(description="Score the first N rows (1-5000).", ge=1, le=5000)] = 100,
    max_tokens: Annotated[int, Field(description="Greedy generation length per row (1-512).", ge=1, le=512)] = 64,
    generate: Annotated[bool, Field(description="Generate and score answers (false: loss only, faster).")] = True,
    regex: Annotated[
        str | None,
        Field(description="Pattern every generation should match (a row's own 'regex' field wins).", max_length=1000),
    ] = None,
    plot: Annotated[bool, Field(description="Also return a bar chart (PNG) of the scores when finished.")] = False,
    wait_seconds: Annotated[
        float,
        Field(
            description="Wait up to this long (0-30 s) for it to finish, with "
            "progress notifications; longer ones keep running.",
            ge=0,
            le=30,
        ),
    ] = 20,
) -> Annotated[CallToolResult, EvaluateResult]:
    """Did the fine-tune help? Scores the base model and job adapters (final or a checkpoint) on
    the same held-out rows: mean completion loss and perplexity; for rows with a reference answer
    (a prompt_completion row's completion, a conversation's last assistant turn) a greedy
    generation scored by exact match, contains and regex; for preference rows, how often the
    chosen answer is more likely than the rejected one. Runs as a background job (job_status,
    cancel_job); short ones finish within wait_seconds and answer at once. Per-row results are
    saved to a file whose path is in the result.
    """
    state = state_of(ctx)
    config, warnings = _resolve(state, targets, dataset, model, max_rows, max_tokens, generate, regex)
    job = record_job(state, config, config.model.id, None, warnings)
    job = state.executor.submit(job.id)
    job = await wait_for_job(
        ctx, state.store, job, wait_seconds, until_change=False, every_s=0.5, progress="{step}/{total} rows"
    )
    status = build_status(state.store, job)
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
    if plot and status.evaluation:
        from llm_mcp.jobs.plot import evaluation_png

        png = await anyio.to_thread.run_sync(
            evaluation_png, status.evaluation, f"{job.id} on {Path(config.dataset).name}"
        )
        out.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"))
    return out


def _resolve(
    state: AppState, targets, dataset, model, max_rows, max_tokens, generate, regex
) -> tuple[EvalConfig, list[str]]:
    """The evaluation's config: every problem with the targets, model, dataset or pattern, reported together."""
    from llm_mcp.inference.targets import job_adapter

    problems: list[str] = []
    resolved: list[EvalTarget] = []
    base_cfg = None
    for label in dict.fromkeys(t.strip() for t in targets):
        if label.lower() == "base":
            resolved.append(EvalTarget(label="base"))
            continue
        job_id, _, checkpoint = label.partition("@")
        try:
            job = state.store.get(job_id)
            adapter, where = job_adapter(state.store, job, checkpoint or "final")
        except LlmMcpError as exc:
            problems.append(f"targets: {label!r}: {exc}")
            continue
        if base_cfg is not None and job.config.model.path != base_cfg.model.path:
            problems.append(
                f"targets: {label!r} was trained on {job.config.model.id}, but {resolved[-1].label!r} "
                f"on {base_cfg.model.id}; evaluate one base model at a time"
            )
            continue
        base_cfg = base_cfg or job.config
        resolved.append(
            EvalTarget(
                label=label,
                job_id=job.id,
                checkpoint=where,
                adapter_path=str(adapter),
                quantized=job.config.quantized,
                sparse=job.method == "sparse",
            )
        )
    refused_jobs = base_cfg is None and any(t.strip().lower() != "base" for t in targets)
    model_ref, context = _base_model(state, base_cfg, model, problems, refused_jobs)
    path = None
    try:
        path = state.settings.check_path(state.settings.under_home(dataset), "dataset")
        summary = validate_dataset(path, "dataset")
    except LlmMcpError as exc:
        problems.extend(getattr(exc, "problems", None) or [str(exc)])
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            problems.append(f"regex={regex!r} is not a valid regular expression ({exc}); fix or drop it")
    if problems or model_ref is None or path is None:
        raise InvalidArgumentError(problems)
    warnings = [f"dataset: {w}" for w in summary.warnings]
    if summary.rows > max_rows:
        warnings.append(f"scoring the first {max_rows} of {summary.rows}+ rows (max_rows)")
    config = EvalConfig(
        model=model_ref,
        targets=resolved,
        dataset=str(path),
        dataset_fingerprint=fingerprint(path),
        max_rows=max_rows,
        max_tokens=max_tokens,
        generate=generate,
        regex=regex,
        max_seq_len=min(context, 4096),
        device="cuda" if state.hardware().gpus else "cpu",
    )
    return config, warnings


def _base_model(state: AppState, job_cfg, model: str | None, problems: list[str], refused_jobs: bool):
    """(ModelRef, context length): the jobs' base, or `model` for base-only evaluations."""
    if job_cfg is not None:
        if model is not None and resolve_model(state.matrix, state.settings, model).id != job_cfg.model.id:
            problems.append(
                f"model={model!r} is not the base the target jobs were trained on ({job_cfg.model.id}); drop model"
            )
        return job_cfg.model, job_cfg.max_seq_len
    if model is None and refused_jobs:
        return None, 0  # the job targets were refused; their errors say why
    if model is None:
        problems.append(
            "model is required when targets has no job (which base model is 'base'?); give model, "
            "or add a job id to targets"
        )
        return None, 0
    try:
        entry = resolve_model(state.matrix, state.settings, model)
    except LlmMcpError as exc:
        problems.append(str(exc))
        return None, 0
    from llm_mcp.core.jobconfig import ModelRef

    return ModelRef(
        id=entry.id,
        path=getattr(entry, "path", entry.id),
        trust_remote_code=entry.trust_remote_code,
        hf_architecture=entry.hf_architecture,
        local=entry.is_local,
    ), entry.context_length


def register(mcp: MCPServer) -> None:
    add_tool(
        mcp,
        evaluate,
        "Evaluate models and adapters",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False),
    )
