"""Where a job starts from and what it trains toward: resume_from, init_from and the objective (SFT or DPO).

Checked and resolved for start_finetune with no torch import."""

from __future__ import annotations

from typing import Any

from llm_mcp.core.errors import InvalidArgumentError, LlmMcpError
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.jobdir import checkpoints
from llm_mcp.core.matrix import ModelEntry
from llm_mcp.core.store import JobStore

OBJECTIVES = ("causal_lm", "dpo")
RESUME_OVERRIDABLE = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "eval_every", "name", "scheduler")
DPO_ARGS = ("beta", "label_smoothing")
# DPO moves a model less than SFT: the alignment-handbook's zephyr-7b-beta QLoRA recipes use 2e-4 for SFT and
# 5e-6 for DPO (recipes/zephyr-7b-beta/{sft,dpo}/config_qlora.yaml), so DPO defaults to 1/40 of the LoRA LR.
DPO_LR_FACTOR = 0.025


def recommended_lr(entry: ModelEntry, args: dict[str, Any]) -> float:
    return entry.recommended_lr * (DPO_LR_FACTOR if args.get("objective") == "dpo" else 1.0)


def check_objective(args: dict[str, Any], problems: list[str]) -> None:
    objective = args.get("objective", "causal_lm")
    if objective not in OBJECTIVES:
        problems.append(
            f"objective={objective!r}; allowed: {list(OBJECTIVES)} (causal_lm = supervised fine-tuning, "
            "dpo = preference tuning on prompt / chosen / rejected rows)"
        )
    elif objective != "dpo":
        given = [k for k in DPO_ARGS if k in args]
        if given:
            problems.append(f"{given} only apply to objective='dpo' (got objective={objective!r})")
    elif "train_on" in args:
        problems.append(
            "train_on does not apply to objective='dpo': its loss is on the chosen and rejected answers; drop train_on"
        )


def init_from(
    store: JobStore, args: dict[str, Any], entry: ModelEntry | None, problems: list[str]
) -> dict[str, Any] | None:
    """init_from=JOB_ID: start from that job's final adapter. Its adapter fixes the adapter's shape, so the
    model and method family must match and no lora_* / target_modules / density may be given."""
    if "init_from" not in args:
        return None
    try:
        old = store.get(args["init_from"])
    except LlmMcpError as exc:
        problems.append(f"init_from: {exc}")
        return None
    adapter = store.job_dir(old.id) / "adapter"
    if old.state != "succeeded" or not any(
        (adapter / f).exists() for f in ("adapter_config.json", "sparse_config.json")
    ):
        problems.append(
            f"init_from={old.id!r} is {old.state} and has no final adapter; give a succeeded job "
            "(job_status lists them)"
        )
        return None
    method = args.get("method")
    family = {"lora": "lora", "qlora": "lora", "dora": "dora", "sparse": "sparse"}
    if entry is not None and old.config.model.id != entry.id:
        problems.append(
            f"init_from={old.id!r} trained {old.config.model.id}, not {entry.id}; an adapter only fits "
            "the model it was trained on"
        )
    if method in family and family[method] != family[old.method]:
        same = [m for m in family if family[m] == family[old.method]]
        problems.append(
            f"init_from={old.id!r} holds a {old.method} adapter, which method={method!r} cannot "
            f"continue; use method in {same}"
        )
    fixed = [
        k
        for k in ("lora_rank", "lora_alpha", "target_modules", "density", "sparsity_ratio", "train_experts")
        if k in args
    ]
    if fixed:
        problems.append(f"{fixed} come from init_from={old.id!r}'s adapter; drop them (or train without init_from)")
    init: dict[str, Any] = {"init_from": old.id, "init_adapter": str(adapter), "lora": old.config.lora.model_dump()}
    init["lora"]["use_dora"] = method == "dora"
    init["lora"]["dropout"] = args.get("lora_dropout", old.config.lora.dropout)  # training-time only: may change
    if old.config.lora.target_parameters and init["lora"]["dropout"]:
        problems.append(
            f"lora_dropout={init['lora']['dropout']!r}: init_from={old.id!r}'s adapter trains MoE experts, "
            "which PEFT trains without dropout; give lora_dropout=0"
        )
    if method == "sparse" and old.config.sparse is not None:
        init["sparse_density"] = old.config.sparse.density
    return init


def resume_base(store: JobStore, args: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """A resume: the old job's config as the base, its request as defaults; only RESUME_OVERRIDABLE may change."""
    try:
        old = store.get(args["resume_from"])
    except LlmMcpError as exc:
        raise InvalidArgumentError(f"resume_from: {exc}") from None
    if old.config.task == "evaluate":
        raise InvalidArgumentError(
            f"resume_from={old.id!r} is an evaluation, not a training job; call evaluate again to re-run it"
        )
    if old.state not in ("failed", "cancelled"):
        problems.append(
            f"resume_from={old.id!r} is {old.state}; only failed or cancelled jobs can be resumed"
            + (" (wait for it or cancel_job it first)" if old.state in ("queued", "running") else "")
        )
    ckpts = checkpoints(store.job_dir(old.id))
    if not ckpts:
        problems.append(f"resume_from={old.id!r} has no checkpoint to resume from; start a new job instead")
    old_request = _request_of(old.config)
    for key in sorted(set(args) - set(RESUME_OVERRIDABLE) - {"resume_from"}):
        if key not in old_request or args[key] != old_request[key]:
            was = repr(old_request[key]) if key in old_request else "default"
            problems.append(
                f"{key}={args[key]!r} differs from the resumed job's {was}; when resuming only "
                f"{list(RESUME_OVERRIDABLE)} may change. Start a new job to change {key}"
            )
    for key, old_value in old_request.items():
        if key not in RESUME_OVERRIDABLE:
            args.setdefault(key, old_value)
    if "max_steps" not in args and "epochs" not in args:
        for key in ("max_steps", "epochs"):
            if getattr(old.config, key) is not None:
                args[key] = getattr(old.config, key)
    base_cfg = old.config.model_dump()
    base_cfg["resume_checkpoint"] = str(ckpts[-1][1]) if ckpts else None
    base_cfg["resume_step"] = ckpts[-1][0] if ckpts else None
    return base_cfg


def _request_of(cfg: JobConfig) -> dict[str, Any]:
    """The arguments a job was started with (its model as the caller named it)."""
    req = dict(cfg.request)
    req.setdefault("model", cfg.model.path if cfg.model.local else cfg.model.id)
    return req
