"""start_finetune's request: validate everything, collect every problem, resolve the config.

Nothing here imports torch: the server validates in milliseconds, the job process trains.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.core.data import DatasetSummary, fingerprint, validate_dataset
from llm_mcp.core.errors import InvalidArgumentError, LlmMcpError
from llm_mcp.core.estimates import linear_names
from llm_mcp.core.experts import check_experts
from llm_mcp.core.fit import plan_memory
from llm_mcp.core.hardware import Hardware, gpu_bf16_peak_flops
from llm_mcp.core.hub import hub_availability, unavailable_message
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.lineage import check_objective, init_from, recommended_lr, resume_base
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.matrix import METHODS, ModelEntry
from llm_mcp.core.placement import check_placement, check_scheduler
from llm_mcp.core.placement import in_range as _in_range
from llm_mcp.core.store import JobStore

IMPLEMENTED_METHODS = ("lora", "qlora", "dora", "sparse")
SPARSE_ARGS = (
    "density",
    "sparsity_ratio",
    "sparsity_type",
    "mask_update_interval",
    "mask_update_fraction",
    "use_rigl",
    "quantize_base",
)
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
# (argument, low, high, type) for every plain range check
RANGES = [
    ("max_steps", 1, 1_000_000, int),
    ("epochs", 0.01, 100, float),
    ("learning_rate", 1e-8, 1.0, float),
    ("lora_rank", 1, 1024, int),
    ("lora_alpha", 0.01, 16384, float),
    ("lora_dropout", 0.0, 0.9, float),
    ("batch_size", 1, 4096, int),
    ("gradient_accumulation", 1, 4096, int),
    ("seed", 0, 2**31 - 1, int),
    ("checkpoint_every", 0, 1_000_000, int),
    ("keep_checkpoints", 1, 100, int),
    ("eval_every", 0, 1_000_000, int),
    ("eval_fraction", 0.0, 0.5, float),
    ("warmup_ratio", 0.0, 0.5, float),
    ("weight_decay", 0.0, 1.0, float),
    ("beta", 0.001, 10.0, float),
    ("label_smoothing", 0.0, 0.49, float),
]
DEFAULTS = dict(
    batch_size=4,
    gradient_accumulation=1,
    max_seq_len=1024,
    train_on="completion",
    seed=0,
    checkpoint_every=50,
    keep_checkpoints=3,
    lr_scheduler="cosine",
    warmup_ratio=0.03,
    weight_decay=0.0,
    max_grad_norm=1.0,
    group_by_length=True,
)


@dataclass
class Resolved:
    config: JobConfig
    entry: ModelEntry
    dataset: DatasetSummary
    estimates: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _flops_per_second(hardware: Hardware, processes: int) -> float:
    """Rough sustained training FLOP/s, for the time estimate only."""
    if not hardware.gpus:
        return 1e10 * max(1, hardware.cpu_count)
    return 0.3 * gpu_bf16_peak_flops(hardware.gpus[0].name) * processes


def resolve_finetune(
    *, matrix, settings, defaults, hardware: Hardware, store: JobStore, args: dict[str, Any]
) -> Resolved:
    """Validate a start_finetune request and resolve it into the job config the trainer reads.

    Raises:
        InvalidArgumentError: every problem found, one per line, with allowed values and next steps.
    """
    problems: list[str] = []
    warnings: list[str] = []
    args = {k: v for k, v in args.items() if v is not None}
    base_cfg = resume_base(store, args, problems) if "resume_from" in args else {}
    for required in ("model", "method", "dataset"):
        if required not in args:
            problems.append(f"{required} is required")
    if problems and not {"model", "method", "dataset"} <= set(args):
        raise InvalidArgumentError(problems)

    entry: ModelEntry | None = None
    try:
        entry = resolve_model(matrix, settings, args["model"])
    except LlmMcpError as exc:
        problems.append(str(exc))
    method = args["method"]
    _check_method(entry, method, problems, warnings)
    _check_ranges(args, entry, hardware, resuming=bool(base_cfg), problems=problems)
    check_objective(args, problems)
    check_scheduler(args, settings, problems)
    init = init_from(store, args, entry, problems)
    lora_defaults, target_modules = _targets(args, entry, defaults, method, problems)
    experts = [] if base_cfg else check_experts(entry, method, args, problems, warnings)
    dataset, eval_set = _datasets(settings, args, problems)
    if problems or entry is None or dataset is None:
        raise InvalidArgumentError(problems)

    cfg = _config_dict(
        args,
        base_cfg,
        entry,
        defaults,
        lora_defaults,
        target_modules,
        dataset,
        eval_set.path if eval_set else None,
        hardware,
    )
    if base_cfg:  # a resume trains exactly the adapter its checkpoints hold
        old = base_cfg["lora"]
        cfg["lora"].update(target_parameters=old.get("target_parameters", []), dropout=old["dropout"])
    elif experts and not init:
        cfg["lora"].update(target_parameters=experts, dropout=0.0)  # PEFT: no dropout on expert parameters
    if init is not None:
        density = init.pop("sparse_density", None)
        cfg.update(init)
        if density is not None and cfg["sparse"]:
            cfg["sparse"]["density"] = density
    lr, recommended = cfg["learning_rate"], recommended_lr(entry, args)
    if not (0.01 * recommended <= lr <= 10 * recommended):
        warnings.append(
            f"learning_rate={lr:g} is far from the recommended {recommended:g} for "
            f"{'DPO on ' if cfg['objective'] == 'dpo' else ''}{entry.id}"
        )
    estimates = _estimates(cfg, args, entry, dataset, hardware, warnings)
    if eval_set is not None:
        estimates["eval_rows"] = eval_set.rows
    estimates["model_source"] = _model_source(entry)
    warnings += dataset.warnings + [f"eval_dataset: {w}" for w in (eval_set.warnings if eval_set else [])]
    config = JobConfig.parse({**cfg, "job_id": None}, "the resolved request")
    return Resolved(config=config, entry=entry, dataset=dataset, estimates=estimates, warnings=warnings)


def _model_source(entry: ModelEntry) -> str:
    """Where the base model loads from; a hub model that cannot be fetched is refused with the next step."""
    if entry.is_local:
        return f"local directory {entry.path}"
    available = hub_availability(entry.id)
    if not available.available:
        raise InvalidArgumentError(unavailable_message(entry.id, available.where))
    return available.where


def _check_method(entry: ModelEntry | None, method: str, problems: list[str], warnings: list[str]) -> None:
    if method not in METHODS:
        problems.append(f"method={method!r}; allowed: {list(METHODS)}")
        return
    if entry is None:
        return
    support = entry.methods[method]
    usable = [m for m in METHODS if entry.methods[m].status != "unsupported" and m in IMPLEMENTED_METHODS]
    if support.status == "unsupported":
        problems.append(
            f"method={method!r} is unsupported for {entry.id}: {support.note}. "
            f"Methods you can use for this model: {usable or 'none'}"
        )
    elif method not in IMPLEMENTED_METHODS:
        problems.append(f"method={method!r} is not implemented in this server version yet; use one of {usable}")
    elif support.status == "experimental":
        warnings.append(f"{method} on {entry.id} is experimental: {support.note}")


def _check_ranges(
    args: dict[str, Any], entry: ModelEntry | None, hardware: Hardware, *, resuming: bool, problems: list[str]
) -> None:
    """Hyperparameters: ranges first, then cross-field rules."""
    method = args["method"]
    for name, lo, hi, kind in RANGES:
        _in_range(problems, name, args.get(name), lo, hi, kind)
    if "max_steps" in args and "epochs" in args and not resuming:
        problems.append("give max_steps or epochs, not both")
    check_placement(args, hardware, problems)
    if method != "sparse":
        given = [k for k in SPARSE_ARGS if k in args and not resuming]
        if given:
            problems.append(f"{given} only apply to method='sparse' (got method={method!r})")
    else:
        _check_sparse(args, entry, problems)
    if args.get("lr_scheduler", "cosine") not in LR_SCHEDULERS:
        problems.append(f"lr_scheduler={args['lr_scheduler']!r}; allowed: {list(LR_SCHEDULERS)}")
    if args.get("train_on", "completion") not in ("completion", "all"):
        problems.append(f"train_on={args['train_on']!r}; allowed: ['completion', 'all']")
    name = args.get("name")
    if name is not None and not re.fullmatch(r"[\w.-]{1,64}", str(name)):
        problems.append(f"name={name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if entry is not None:
        _in_range(problems, "max_seq_len", args.get("max_seq_len"), 8, entry.context_length)


def _check_sparse(args: dict[str, Any], entry: ModelEntry | None, problems: list[str]) -> None:
    _in_range(problems, "density", args.get("density"), 1e-6, 1.0, float)
    _in_range(problems, "sparsity_ratio", args.get("sparsity_ratio"), 0.0, 0.999999, float)
    _in_range(problems, "mask_update_interval", args.get("mask_update_interval"), 1, 1_000_000)
    _in_range(problems, "mask_update_fraction", args.get("mask_update_fraction"), 0.0, 1.0, float)
    if "density" in args and "sparsity_ratio" in args:
        problems.append("give density or sparsity_ratio (= 1 - density), not both")
    if args.get("sparsity_type", "unstructured") != "unstructured":
        problems.append(
            f"sparsity_type={args['sparsity_type']!r}; allowed: ['unstructured'] (structured "
            "sparsity is not implemented)"
        )
    if args.get("quantize_base") and entry is not None and entry.methods["qlora"].status == "unsupported":
        problems.append(
            f"quantize_base=true needs a 4-bit base, which {entry.id} does not support "
            f"(qlora: {entry.methods['qlora'].note})"
        )


def _targets(args: dict[str, Any], entry: ModelEntry | None, defaults, method: str, problems: list[str]):
    """(the method's LoRA defaults, the module names to adapt), checked against the model's linear layers."""
    method_defaults = defaults.get(method) if method in METHODS else None
    lora_defaults = method_defaults.lora if method_defaults and method_defaults.lora else defaults["lora"].lora
    target_modules = args.get("target_modules") or (
        entry.target_modules
        if entry is not None and lora_defaults.target_modules == "auto"
        else lora_defaults.target_modules
    )
    if entry is not None and isinstance(target_modules, list):
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            problems.append(f"target_modules={target_modules!r}: give a non-empty list of module names")
        else:
            allowed = linear_names(entry.dims, entry.hf_architecture)
            for module in target_modules:
                if module not in allowed:
                    problems.append(
                        f"target_modules contains {module!r}, which {entry.id} does not have as a "
                        f"linear layer; allowed: {allowed}"
                    )
    return lora_defaults, target_modules


def _datasets(
    settings, args: dict[str, Any], problems: list[str]
) -> tuple[DatasetSummary | None, DatasetSummary | None]:
    """(the training set's summary, the eval set's), each validated under the allowed roots."""
    dataset = None
    eval_set = None
    for key in ("dataset", "eval_dataset"):
        if key not in args:
            continue
        try:
            path = settings.check_path(settings.under_home(args[key]), key)
            summary = validate_dataset(path, key, objective=args.get("objective", "causal_lm"))
        except LlmMcpError as exc:
            problems.extend(getattr(exc, "problems", None) or [str(exc)])
            continue
        if key == "dataset":
            dataset = summary
        else:
            eval_set = summary
    if "eval_dataset" in args and args.get("eval_fraction"):
        problems.append("give eval_dataset or eval_fraction, not both")
    return dataset, eval_set


def _config_dict(
    args, base_cfg, entry: ModelEntry, defaults, lora_defaults, target_modules, dataset, eval_path, hardware: Hardware
) -> dict[str, Any]:
    """The job config's fields: request over the resumed config over the defaults."""
    cfg: dict[str, Any] = {**DEFAULTS, **base_cfg}
    for key in DEFAULTS:
        if key in args:
            cfg[key] = args[key]
    method = args["method"]
    rank = args.get("lora_rank", lora_defaults.rank)
    cfg.update(
        model={
            "id": entry.id,
            "path": getattr(entry, "path", entry.id),
            "trust_remote_code": entry.trust_remote_code,
            "hf_architecture": entry.hf_architecture,
            "local": entry.is_local,
        },
        method=method,
        dataset=dataset.path,
        eval_dataset=eval_path,
        dataset_fingerprint=fingerprint(Path(dataset.path)),
        eval_dataset_fingerprint=fingerprint(Path(eval_path)) if eval_path else None,
        eval_fraction=args.get("eval_fraction", 0.0 if eval_path else cfg.get("eval_fraction", 0.0)),
        max_steps=args.get("max_steps"),
        epochs=args.get("epochs", 1.0 if "max_steps" not in args else None),
        learning_rate=args.get("learning_rate", recommended_lr(entry, args)),
        num_processes=args.get("num_processes", 1),
        nodes=args.get("nodes", cfg.get("nodes", 1)),
        scheduler=args.get("scheduler", cfg.get("scheduler")),
        objective=args.get("objective", "causal_lm"),
        dpo={"beta": args.get("beta", 0.1), "label_smoothing": args.get("label_smoothing", 0.0)}
        if args.get("objective") == "dpo"
        else None,
        eval_every=args.get("eval_every", cfg.get("eval_every", 0)),
        lora={
            "rank": rank,
            "alpha": args.get("lora_alpha", lora_defaults.alpha if "lora_rank" not in args else rank),
            "dropout": args.get("lora_dropout", lora_defaults.dropout),
            "target_modules": target_modules,
            "use_dora": method == "dora",
            "bias": lora_defaults.bias,
        },
        quantization=defaults["qlora"].quantization.model_dump()
        if method == "qlora" or (method == "sparse" and args.get("quantize_base"))
        else None,
        sparse=_sparse_config(defaults["sparse"].sparse, args) if method == "sparse" else None,
        device="cuda" if hardware.gpus else "cpu",
        request={k: v for k, v in args.items() if k != "resume_from"},
        resume_from=args.get("resume_from"),
    )
    return cfg


def _estimates(
    cfg: dict[str, Any],
    args: dict[str, Any],
    entry: ModelEntry,
    dataset: DatasetSummary,
    hardware: Hardware,
    warnings: list[str],
) -> dict[str, Any]:
    """Memory (refused with what would fit if it does not), steps, tokens and time; sets gradient_checkpointing."""
    method, rank, sparse = cfg["method"], cfg["lora"]["rank"], cfg["sparse"]
    plan = plan_memory(
        entry,
        method,
        hardware,
        target_modules=cfg["lora"]["target_modules"],
        rank=rank,
        train_experts=bool(cfg["lora"].get("target_parameters")),
        batch_size=cfg["batch_size"] * (2 if cfg["objective"] == "dpo" else 1),
        seq_len=cfg["max_seq_len"],
        quantized=bool(sparse and sparse["quantize_base"]),
        density=sparse["density"] if sparse else "auto",
        rigl_fraction=sparse["mask_update_fraction"] if sparse and sparse["use_rigl"] else 0.0,
        num_processes=args.get("num_processes"),
        gradient_checkpointing=args.get("gradient_checkpointing"),
    )
    est, usable = plan.estimate, plan.usable_gb
    cfg.update(
        gradient_checkpointing=plan.gradient_checkpointing, distributed=plan.distributed, num_processes=plan.processes
    )
    if not plan.fits:
        raise InvalidArgumentError(
            [
                f"estimated memory {est.total_gb:g} GB per process exceeds the {usable:g} GB usable on "
                f"{hardware.describe()} by one process"
            ]
            + _fitting_alternatives(entry, method, rank, cfg, hardware)
        )
    if plan.distributed == "fsdp":
        warnings.append(
            f"{entry.id} does not fit one GPU: the job runs FSDP over {plan.processes} GPUs "
            f"(weights and optimizer state sharded, about {est.total_gb:g} GB per GPU)"
        )
    free = hardware.free_gb()
    if hardware.source == "detected" and free is not None and est.total_gb > free:
        warnings.append(
            f"the job needs about {est.total_gb:g} GB per process but only {free:g} GB of "
            f"{'GPU memory' if hardware.gpus else 'RAM'} is free right now; it may "
            f"{'run out of memory' if hardware.gpus else 'swap or be killed'} unless other programs free memory"
        )
    eval_rows = int(dataset.rows * cfg["eval_fraction"]) if cfg["eval_fraction"] else 0
    train_rows = dataset.rows - eval_rows
    per_step = cfg["batch_size"] * cfg["gradient_accumulation"] * cfg["num_processes"]
    if train_rows < per_step:
        raise InvalidArgumentError(
            f"dataset has {train_rows} training rows, but one step needs batch_size x gradient_accumulation x "
            f"num_processes = {per_step}; lower batch_size or add data"
        )
    steps_per_epoch = train_rows // per_step
    total_steps = cfg["max_steps"] or max(1, math.ceil(cfg["epochs"] * steps_per_epoch))
    if cfg.get("resume_checkpoint"):
        done = cfg["resume_step"]
        if total_steps <= done:
            raise InvalidArgumentError(
                f"max_steps={total_steps} is not past the checkpoint at step {done} of {cfg['resume_from']!r}; "
                f"give max_steps > {done} (or omit it to keep the original run's length)"
            )
    tokens_per_row = max(1, min(dataset.approx_tokens // max(1, dataset.rows), cfg["max_seq_len"]))
    tokens = total_steps * per_step * tokens_per_row
    flops_per_token = 4 * entry.active_params_b * 1e9
    if cfg["objective"] == "dpo":  # approx_tokens already counts both answers; add the reference forward (1/3)
        flops_per_token *= 4 / 3
    seconds = flops_per_token * tokens / _flops_per_second(hardware, cfg["num_processes"])
    if not dataset.complete:
        warnings.append(f"validated the first {dataset.rows} rows within the time budget; the job checks the rest")
    return {
        "trainable_params": est.trainable_params,
        "memory_gb": est.total_gb,
        "memory": est.to_dict(),
        "usable_memory_gb": usable,
        "hardware": hardware.describe(),
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "approx_tokens": tokens,
        "rough_time_s": round(seconds + 15, 1),
        "dataset_formats": dataset.formats,
    }


def _sparse_config(defaults, args: dict[str, Any]) -> dict[str, Any]:
    """density: explicit, or 1 - sparsity_ratio (seed 002's knob), or 'auto' (LoRA rank 32's count)."""
    density = args.get("density")
    if density is None and args.get("sparsity_ratio") is not None:
        density = round(1.0 - args["sparsity_ratio"], 6)
    if density is None:
        density = defaults.density if defaults.sparsity_ratio is None else round(1 - defaults.sparsity_ratio, 6)
    return {
        "density": density,
        "sparsity_type": "unstructured",
        "mask_update_interval": args.get("mask_update_interval", defaults.mask_update_interval),
        "mask_update_fraction": args.get("mask_update_fraction", defaults.mask_update_fraction),
        "use_rigl": args.get("use_rigl", defaults.use_rigl),
        "quantize_base": bool(args.get("quantize_base")),
    }


def _fitting_alternatives(entry: ModelEntry, method: str, rank: int, cfg: dict[str, Any], hw: Hardware) -> list[str]:
    """Suggest a method / rank / batch / sequence length that fits `hw`, if any does."""
    out = []
    candidates = [
        ("method='qlora'", "qlora", rank, cfg["batch_size"], cfg["max_seq_len"]),
        ("batch_size=1", method, rank, 1, cfg["max_seq_len"]),
        (f"max_seq_len={min(512, cfg['max_seq_len'])}, batch_size=1", method, rank, 1, min(512, cfg["max_seq_len"])),
        (
            f"method='qlora', batch_size=1, max_seq_len={min(512, cfg['max_seq_len'])}",
            "qlora",
            rank,
            1,
            min(512, cfg["max_seq_len"]),
        ),
        ("method='qlora', lora_rank=8, batch_size=1, max_seq_len=256", "qlora", 8, 1, 256),
    ]
    for label, m, r, b, s in candidates:
        if m == method and (r, b, s) == (rank, cfg["batch_size"], cfg["max_seq_len"]):
            continue
        if entry.methods[m].status == "unsupported":
            continue
        plan = plan_memory(entry, m, hw, target_modules=cfg["lora"]["target_modules"], rank=r, batch_size=b, seq_len=s)
        if plan.fits:
            how = f", FSDP over {plan.processes} GPUs" if plan.distributed == "fsdp" else ""
            out.append(f"would fit: {label} (estimated {plan.estimate.total_gb:g} GB per process{how})")
            break
    if not out:
        out.append(
            f"no smaller setting fits; {entry.id} needs about {entry.methods['qlora'].min_gpu_memory_gb:g} GB "
            "of GPU memory with QLoRA. Call list_models(fits=true) for models that fit this machine"
        )
    return out
