"""start_finetune's validation: a typed request in, a job config (or every problem at once) out.

Everything a start needs is checked here: the model, the method's status for it and its options, the
objective's, ranges between arguments, placement, the datasets, the memory plan, the token counts, the
queue and the state directory's reach. Nothing mutates the caller's request. Token counting imports the
tokenizer (llm_mcp.modeling.preview) on first use; nothing else here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.core.data import DatasetSummary, fingerprint, validate_dataset
from llm_mcp.core.errors import InvalidArgumentError, LlmMcpError
from llm_mcp.core.experts import check_experts
from llm_mcp.core.hardware import Hardware
from llm_mcp.core.hub import hub_availability, unavailable_message
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.matrix import Matrix, ModelEntry
from llm_mcp.core.methods import METHOD_OPTIONS, METHODS, Method
from llm_mcp.core.methods.defaults import LoraDefaults, MethodDefaults
from llm_mcp.core.objectives import OBJECTIVE_OPTIONS, OBJECTIVES, Objective, get_objective
from llm_mcp.core.request import field_default
from llm_mcp.core.settings import Settings
from llm_mcp.core.shapes import linear_names
from llm_mcp.core.store import JobStore
from llm_mcp.validation.lineage import Resume, init_from, resume
from llm_mcp.validation.placement import placement, scheduler
from llm_mcp.validation.plan import plan
from llm_mcp.validation.requests import FinetuneRequest
from llm_mcp.validation.sources import dataset_source, source_fields


@dataclass(frozen=True)
class ValidationContext:
    """What validation checks a request against: the server's matrix, settings, defaults, the executor's
    hardware and queue, and whether the state directory reaches the executor's nodes."""

    matrix: Matrix
    settings: Settings
    defaults: dict[str, MethodDefaults]
    hardware: Hardware
    store: JobStore
    queued: int = 0
    home_warning: str | None = None


@dataclass
class Resolved:
    config: JobConfig
    entry: ModelEntry
    dataset: DatasetSummary
    estimates: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def resolve_finetune(request: FinetuneRequest, ctx: ValidationContext) -> Resolved:
    """Validate a start_finetune request and resolve it into the job config the trainer reads.

    Raises:
        InvalidArgumentError: every problem found, one per line, with allowed values and next steps.
    """
    problems: list[str] = list(request.problems)
    warnings: list[str] = []
    resumed: Resume | None = None
    if request.resume_from is not None:
        resumed = resume(ctx.store, request, problems)
        request = resumed.request
    entry: ModelEntry | None = None
    try:
        entry = resolve_model(ctx.matrix, ctx.settings, request.model)
    except LlmMcpError as exc:
        problems.append(str(exc))
    method, objective = METHODS[request.method], get_objective(request.objective)
    _check_method(entry, method, problems, warnings)
    _check_options(request, method, objective, resuming=resumed is not None, problems=problems)
    method.check(request, entry, problems)
    nodes, processes = placement(request, ctx.hardware, problems)
    sched = scheduler(request, ctx.settings.executor, problems)
    if entry is not None and request.max_seq_len is not None and request.max_seq_len > entry.context_length:
        problems.append(
            f"max_seq_len={request.max_seq_len} is out of range; allowed: an integer from 8 to {entry.context_length}"
        )
    init = init_from(ctx.store, request, method, entry, problems)
    lora_defaults, target_modules = _targets(request, entry, ctx.defaults[method.name].lora, problems)
    experts = [] if resumed else check_experts(entry, method, request, problems, warnings)
    dataset, eval_set = _datasets(ctx.settings, request, objective, problems)
    if not request.dry_run and ctx.queued >= ctx.settings.max_queued:
        problems.append(
            f"{ctx.queued} jobs are already queued (the limit is LLM_MCP_MAX_QUEUED={ctx.settings.max_queued}); "
            "wait for some to finish (job_status()) or cancel_job the ones you no longer need, then call again"
        )
    if problems or entry is None or dataset is None:
        raise InvalidArgumentError(problems)

    cfg = _config(request, resumed, entry, method, objective, ctx, lora_defaults, target_modules, dataset, eval_set)
    cfg.update(nodes=nodes, scheduler=sched if sched is not None else cfg.get("scheduler"))
    if resumed is not None:  # a resume trains exactly the adapter its checkpoints hold
        old = resumed.config["lora"]
        cfg["lora"].update(target_parameters=old.get("target_parameters", []), dropout=old["dropout"])
    elif experts and init is None:
        cfg["lora"].update(target_parameters=experts, dropout=0.0)  # PEFT: no dropout on expert parameters
    if init is not None:
        density = init.pop("sparse_density", None)
        cfg.update(init)
        if density is not None and cfg["sparse"]:
            cfg["sparse"]["density"] = density
    lr, recommended = cfg["learning_rate"], entry.recommended_lr * objective.lr_factor
    if not (0.01 * recommended <= lr <= 10 * recommended):
        about = f"{objective.title} on " if objective.lr_factor != 1 else ""
        warnings.append(f"learning_rate={lr:g} is far from the recommended {recommended:g} for {about}{entry.id}")
    estimates = plan(
        cfg,
        method,
        objective,
        ctx.defaults[method.name],
        entry,
        dataset,
        ctx.hardware,
        (processes, request.gradient_checkpointing),
        warnings,
        ctx.settings.home,
    )
    warnings += method.warnings(cfg, estimates)
    if eval_set is not None:
        estimates["eval_rows"] = eval_set.rows
    estimates["model_source"] = _model_source(entry)
    warnings += dataset.warnings + [f"eval_dataset: {w}" for w in (eval_set.warnings if eval_set else [])]
    config = JobConfig.parse({**cfg, "job_id": None}, "the resolved request")
    resolved = Resolved(config=config, entry=entry, dataset=dataset, estimates=estimates, warnings=warnings)
    _count_tokens(resolved)
    if ctx.home_warning is not None:
        resolved.warnings.append(ctx.home_warning)
    return resolved


def _model_source(entry: ModelEntry) -> str:
    """Where the base model loads from; a hub model that cannot be fetched is refused with the next step."""
    if entry.is_local:
        return f"local directory {getattr(entry, 'path', entry.id)}"
    available = hub_availability(entry.id)
    if not available.available:
        raise InvalidArgumentError(unavailable_message(entry.id, available.where))
    return available.where


def _check_method(entry: ModelEntry | None, method: Method, problems: list[str], warnings: list[str]) -> None:
    if entry is None:
        return
    support = entry.methods[method.name]
    if support.status == "unsupported":
        usable = [m for m, s in entry.methods.items() if s.status != "unsupported"]
        problems.append(
            f"method={method.name!r} is unsupported for {entry.id}: {support.note}. "
            f"Methods you can use for this model: {usable or 'none'}"
        )
    elif support.status == "experimental":
        warnings.append(f"{method.name} on {entry.id} is experimental: {support.note}")


def _check_options(
    request: FinetuneRequest, method: Method, objective: Objective, *, resuming: bool, problems: list[str]
) -> None:
    """Options that belong to another method or objective are refused, naming the one they belong to."""
    for kind, options, mine, owners in (
        ("method", METHOD_OPTIONS, method, METHODS.values()),
        ("objective", OBJECTIVE_OPTIONS, objective, OBJECTIVES.values()),
    ):
        if kind == "method" and resuming:
            continue
        given = [k for k in options if k not in mine.options and getattr(request, k) is not None]
        names = [o.name for o in owners if set(given) & set(o.options)]
        if given:
            where = f"{kind}={names[0]!r}" if len(names) == 1 else f"{kind} in {names}"
            problems.append(f"{given} only apply to {where} (got {kind}={mine.name!r})")
    objective.check(request, problems)


def _targets(
    request: FinetuneRequest, entry: ModelEntry | None, lora: LoraDefaults, problems: list[str]
) -> tuple[LoraDefaults, list[str]]:
    """(the method's LoRA defaults, the module names to adapt), checked against the model's linear layers."""
    if request.target_modules:
        targets = list(request.target_modules)
    elif entry is not None and lora.target_modules == "auto":
        targets = list(entry.target_modules)
    else:
        targets = [] if lora.target_modules == "auto" else list(lora.target_modules)
    if entry is not None and request.target_modules is not None:
        allowed = linear_names(entry.dims, entry.hf_architecture)
        for module in targets:
            if module not in allowed:
                problems.append(
                    f"target_modules contains {module!r}, which {entry.id} does not have as a "
                    f"linear layer; allowed: {allowed}"
                )
    return lora, targets


def _datasets(
    settings: Settings, request: FinetuneRequest, objective: Objective, problems: list[str]
) -> tuple[DatasetSummary | None, DatasetSummary | None]:
    """(the training set's summary, the eval set's), each validated under the allowed roots."""
    out: dict[str, DatasetSummary | None] = {"dataset": None, "eval_dataset": None}
    for key in out:
        value = getattr(request, key)
        if value is None:
            continue
        try:
            hub = (request.subset, request.split, request.revision) if key == "dataset" else (None, None, None)
            source = dataset_source(settings, value, key, *hub)
            out[key] = validate_dataset(source, key, objective=objective.name, columns=request.columns)
        except LlmMcpError as exc:
            problems.extend(getattr(exc, "problems", None) or [str(exc)])
    return out["dataset"], out["eval_dataset"]


def _config(
    request: FinetuneRequest,
    resumed: Resume | None,
    entry: ModelEntry,
    method: Method,
    objective: Objective,
    ctx: ValidationContext,
    lora: LoraDefaults,
    target_modules: list[str],
    dataset: DatasetSummary,
    eval_set: DatasetSummary | None,
) -> dict[str, Any]:
    """The job config's fields: the request over the resumed config over the job config's defaults."""
    cfg: dict[str, Any] = dict(resumed.config) if resumed else {}
    for key in ("batch_size", "gradient_accumulation", "max_seq_len", "train_on", "train_reasoning", "seed",
                "checkpoint_every", "keep_checkpoints", "lr_scheduler", "warmup_ratio", "group_by_length"):  # fmt: skip
        if getattr(request, key) is not None:
            cfg[key] = getattr(request, key)
        cfg.setdefault(key, field_default(JobConfig, key))  # the job config's default
    eval_path = eval_set.path if eval_set else None
    rank = request.lora_rank or lora.rank
    alpha = request.lora_alpha or (lora.alpha if request.lora_rank is None else rank)
    cfg.update(
        model={
            "id": entry.id,
            "path": getattr(entry, "path", entry.id),
            "trust_remote_code": entry.trust_remote_code,
            "hf_architecture": entry.hf_architecture,
            "local": entry.is_local,
        },
        method=method.name,
        objective=objective.name,
        **source_fields(dataset.source),
        eval_dataset=eval_path,
        eval_dataset_fingerprint=fingerprint(Path(eval_path)) if eval_path else None,
        eval_fraction=request.eval_fraction
        if request.eval_fraction is not None
        else (0.0 if eval_path else cfg.get("eval_fraction", 0.0)),
        max_steps=request.max_steps,
        epochs=request.epochs if request.epochs is not None else (1.0 if request.max_steps is None else None),
        learning_rate=request.learning_rate or entry.recommended_lr * objective.lr_factor,
        eval_every=request.eval_every if request.eval_every is not None else cfg.get("eval_every", 0),
        lora={
            "rank": rank,
            "alpha": alpha,
            "dropout": lora.dropout if request.lora_dropout is None else request.lora_dropout,
            "target_modules": target_modules,
            "use_dora": method.use_dora,
            "bias": lora.bias,
        },
        device="cuda" if ctx.hardware.gpus else "cpu",
        columns=request.columns,
        request=request.given(),
        resume_from=request.resume_from,
        **{section: None for o in OBJECTIVES.values() for section in o.sections},
    )
    cfg.update(**objective.job_settings(request), **method.job_settings(request, ctx.defaults))
    return cfg


def _count_tokens(resolved: Resolved) -> None:
    """Encode the rows as the trainer will: truncations and drops become warnings, token counts estimates."""
    from llm_mcp.modeling.preview import job_token_report

    report = job_token_report(resolved.config)
    if report is None:
        resolved.estimates["tokens"] = "not counted: the tokenizer is not available locally"
        return
    if report.unrenderable:
        raise InvalidArgumentError(
            [f"dataset: {report.unrenderable} row(s) cannot be rendered by {resolved.entry.id}'s chat template"]
            + [f"dataset {where}" for where in report.unrenderable_at]
        )
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
