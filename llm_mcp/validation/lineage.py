"""Where a job starts from: resume_from (a failed or cancelled job's checkpoint) and init_from (a succeeded
job's adapter, trained further). Checked without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_mcp.core.errors import InvalidArgumentError, LlmMcpError
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.jobdir import checkpoints
from llm_mcp.core.layouts import layout_of
from llm_mcp.core.matrix import ModelEntry
from llm_mcp.core.methods import METHODS, Method, get_method
from llm_mcp.core.store import JobStore
from llm_mcp.validation.requests import FinetuneRequest

RESUME_OVERRIDABLE = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "eval_every", "name", "scheduler")
# Given by an init_from job's adapter: a request may not set them.
ADAPTER_SHAPE = ("lora_rank", "lora_alpha", "target_modules", "density", "sparsity_ratio", "train_experts")


@dataclass(frozen=True)
class Resume:
    """A resume: the request with the old job's arguments filled in, and the old job's config to continue."""

    request: FinetuneRequest
    config: dict[str, Any]


def init_from(
    store: JobStore, request: FinetuneRequest, method: Method, entry: ModelEntry | None, problems: list[str]
) -> dict[str, Any] | None:
    """init_from=JOB_ID: the job-config fields that start from that job's final adapter. Its adapter fixes the
    adapter's shape, so the model and method family must match and no lora_* / target_modules / density may
    be given."""
    if request.init_from is None:
        return None
    try:
        old = store.get(request.init_from)
    except LlmMcpError as exc:
        problems.append(f"init_from: {exc}")
        return None
    adapter = store.job_dir(old.id) / "adapter"
    if old.state != "succeeded" or layout_of(adapter) is None or not isinstance(old.config, JobConfig):
        problems.append(
            f"init_from={old.id!r} is {old.state} and has no final adapter; give a succeeded job "
            "(job_status lists them)"
        )
        return None
    if entry is not None and old.config.model.id != entry.id:
        problems.append(
            f"init_from={old.id!r} trained {old.config.model.id}, not {entry.id}; an adapter only fits "
            "the model it was trained on"
        )
    previous = get_method(old.method)
    if method.family != previous.family:
        same = [name for name, m in METHODS.items() if m.family == previous.family]
        problems.append(
            f"init_from={old.id!r} holds a {old.method} adapter, which method={method.name!r} cannot "
            f"continue; use method in {same}"
        )
    fixed = [k for k in ADAPTER_SHAPE if getattr(request, k) is not None]
    if fixed:
        problems.append(f"{fixed} come from init_from={old.id!r}'s adapter; drop them (or train without init_from)")
    lora = old.config.lora.model_dump()
    lora["use_dora"] = method.use_dora
    lora["dropout"] = old.config.lora.dropout if request.lora_dropout is None else request.lora_dropout
    if old.config.lora.target_parameters and lora["dropout"]:
        problems.append(
            f"lora_dropout={lora['dropout']!r}: init_from={old.id!r}'s adapter trains MoE experts, "
            "which PEFT trains without dropout; give lora_dropout=0"
        )
    init: dict[str, Any] = {"init_from": old.id, "init_adapter": str(adapter), "lora": lora}
    if old.config.sparse is not None:  # the same family: a sparse delta keeps its density
        init["sparse_density"] = old.config.sparse.density
    return init


def resume(store: JobStore, request: FinetuneRequest, problems: list[str]) -> Resume:
    """A resume: the old job's request as defaults; only RESUME_OVERRIDABLE may change.

    Raises:
        InvalidArgumentError: the job does not exist or is an evaluation.
    """
    assert request.resume_from is not None
    try:
        old = store.get(request.resume_from)
    except LlmMcpError as exc:
        raise InvalidArgumentError(f"resume_from: {exc}") from None
    if not isinstance(old.config, JobConfig):
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
    given = request.given()
    for key in sorted(set(given) - set(RESUME_OVERRIDABLE)):
        if key not in old_request or given[key] != old_request[key]:
            was = repr(old_request[key]) if key in old_request else "default"
            problems.append(
                f"{key}={given[key]!r} differs from the resumed job's {was}; when resuming only "
                f"{list(RESUME_OVERRIDABLE)} may change. Start a new job to change {key}"
            )
    merged = {k: v for k, v in old_request.items() if k not in RESUME_OVERRIDABLE} | given
    if "max_steps" not in merged and "epochs" not in merged:
        for key in ("max_steps", "epochs"):
            if getattr(old.config, key) is not None:
                merged[key] = getattr(old.config, key)
    config = old.config.model_dump()
    config["resume_checkpoint"] = str(ckpts[-1][1]) if ckpts else None
    config["resume_step"] = ckpts[-1][0] if ckpts else None
    merged_request = FinetuneRequest.model_validate({**merged, "resume_from": old.id, "dry_run": request.dry_run})
    return Resume(request=merged_request, config=config)


def _request_of(cfg: JobConfig) -> dict[str, Any]:
    """The arguments a job was started with (its model as the caller named it)."""
    req = dict(cfg.request)
    req.setdefault("model", cfg.model.path if cfg.model.local else cfg.model.id)
    return req
