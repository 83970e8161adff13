"""start_finetune's objective (SFT or DPO) and init_from: checked and resolved with no torch import."""

from __future__ import annotations

from typing import Any

from llm_mcp.core.errors import LlmMcpError
from llm_mcp.core.matrix import ModelEntry
from llm_mcp.core.store import JobStore

OBJECTIVES = ("causal_lm", "dpo")
DPO_ARGS = ("beta", "label_smoothing")
# DPO moves a model less than SFT: the alignment-handbook's zephyr-7b-beta QLoRA recipes use 2e-4 for SFT and
# 5e-6 for DPO (recipes/zephyr-7b-beta/{sft,dpo}/config_qlora.yaml), so DPO defaults to 1/40 of the LoRA LR.
DPO_LR_FACTOR = 0.025


def recommended_lr(entry: ModelEntry, args: dict[str, Any]) -> float:
    return entry.recommended_lr * (DPO_LR_FACTOR if args.get("objective") == "dpo" else 1.0)


def check_objective(args: dict[str, Any], problems: list[str]) -> None:
    objective = args.get("objective", "causal_lm")
    if objective not in OBJECTIVES:
        problems.append(f"objective={objective!r}; allowed: {list(OBJECTIVES)} (causal_lm = supervised fine-tuning, "
                        "dpo = preference tuning on prompt / chosen / rejected rows)")
    elif objective != "dpo":
        given = [k for k in DPO_ARGS if k in args]
        if given:
            problems.append(f"{given} only apply to objective='dpo' (got objective={objective!r})")
    elif "train_on" in args:
        problems.append("train_on does not apply to objective='dpo': its loss is on the chosen and rejected "
                        "answers; drop train_on")


def init_from(store: JobStore, args: dict[str, Any], entry: ModelEntry | None,
               problems: list[str]) -> dict[str, Any] | None:
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
    if old.state != "succeeded" or not any((adapter / f).exists() for f in ("adapter_config.json",
                                                                           "sparse_config.json")):
        problems.append(f"init_from={old.id!r} is {old.state} and has no final adapter; give a succeeded job "
                        "(job_status lists them)")
        return None
    method = args.get("method")
    family = {"lora": "lora", "qlora": "lora", "dora": "dora", "sparse": "sparse"}
    if entry is not None and old.config.model.id != entry.id:
        problems.append(f"init_from={old.id!r} trained {old.config.model.id}, not {entry.id}; an adapter only fits "
                        "the model it was trained on")
    if method in family and family[method] != family[old.method]:
        same = [m for m in family if family[m] == family[old.method]]
        problems.append(f"init_from={old.id!r} holds a {old.method} adapter, which method={method!r} cannot "
                        f"continue; use method in {same}")
    fixed = [k for k in ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "density", "sparsity_ratio")
             if k in args]
    if fixed:
        problems.append(f"{fixed} come from init_from={old.id!r}'s adapter; drop them (or train without init_from)")
    init: dict[str, Any] = {"init_from": old.id, "init_adapter": str(adapter),
                            "lora": old.config.lora.model_dump()}
    init["lora"]["use_dora"] = method == "dora"
    if method == "sparse" and old.config.sparse is not None:
        init["sparse_density"] = old.config.sparse.density
    return init
