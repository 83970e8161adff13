"""evaluate's validation: targets (base, jobs, checkpoints), the base model, the dataset and the pattern
resolved into the evaluation job's config, every problem at once."""

from __future__ import annotations

import re

from llm_mcp.core.data import validate_dataset
from llm_mcp.core.errors import InvalidArgumentError, LlmMcpError
from llm_mcp.core.graders import check_graders
from llm_mcp.core.jobconfig import EvalConfig, EvalTarget, ModelRef
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.methods import get_method
from llm_mcp.inference.targets import job_adapter
from llm_mcp.validation.finetune import ValidationContext
from llm_mcp.validation.requests import EvaluateRequest
from llm_mcp.validation.sources import dataset_source, source_fields


def resolve_evaluation(request: EvaluateRequest, ctx: ValidationContext) -> tuple[EvalConfig, list[str]]:
    """The evaluation's config: every problem with the targets, model, dataset or pattern, reported together.

    Raises:
        InvalidArgumentError: every problem found.
    """
    targets, dataset, model, regex = request.targets, request.dataset, request.model, request.regex
    max_rows = request.max_rows
    problems: list[str] = list(request.problems)
    resolved: list[EvalTarget] = []
    base_cfg = None
    for label in dict.fromkeys(t.strip() for t in targets):
        if label.lower() == "base":
            resolved.append(EvalTarget(label="base"))
            continue
        job_id, _, checkpoint = label.partition("@")
        try:
            job = ctx.store.get(job_id)
            adapter, where = job_adapter(ctx.store, job, checkpoint or "final")
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
                quantized=job.training.quantized,
                layout=get_method(job.method).layout,
            )
        )
    refused_jobs = base_cfg is None and any(t.strip().lower() != "base" for t in targets)
    model_ref, context = _base_model(ctx, base_cfg, model, problems, refused_jobs)
    path = None
    try:
        path = dataset_source(ctx.settings, dataset, "dataset", request.subset, request.split, request.revision)
        summary = validate_dataset(path, "dataset", columns=request.columns)
    except LlmMcpError as exc:
        problems.extend(getattr(exc, "problems", None) or [str(exc)])
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            problems.append(f"regex={regex!r} is not a valid regular expression ({exc}); fix or drop it")
    if request.graders:
        problems += check_graders(request.graders)
        if any(g.grader == "agent" for g in request.graders):
            problems.append(
                "graders: the agent grader scores a GRPO job's steps; evaluate with built-in or http graders"
            )
    if problems or model_ref is None or path is None:
        raise InvalidArgumentError(problems)
    warnings = [f"dataset: {w}" for w in summary.warnings]
    if summary.rows > max_rows:
        warnings.append(f"scoring the first {max_rows} of {summary.rows}+ rows (max_rows)")
    config = EvalConfig(
        model=model_ref,
        targets=resolved,
        **source_fields(path),
        columns=request.columns,
        max_rows=max_rows,
        max_tokens=request.max_tokens,
        generate=request.generate,
        regex=regex,
        graders=request.graders,
        max_seq_len=min(context, 4096),
        device="cuda" if ctx.hardware.gpus else "cpu",
    )
    return config, warnings


def _base_model(ctx: ValidationContext, job_cfg, model: str | None, problems: list[str], refused_jobs: bool):
    """(ModelRef, context length): the jobs' base, or `model` for base-only evaluations."""
    if job_cfg is not None:
        if model is not None and resolve_model(ctx.matrix, ctx.settings, model).id != job_cfg.model.id:
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
        entry = resolve_model(ctx.matrix, ctx.settings, model)
    except LlmMcpError as exc:
        problems.append(str(exc))
        return None, 0
    return ModelRef(
        id=entry.id,
        path=getattr(entry, "path", entry.id),
        trust_remote_code=entry.trust_remote_code,
        hf_architecture=entry.hf_architecture,
        local=entry.is_local,
    ), entry.context_length
