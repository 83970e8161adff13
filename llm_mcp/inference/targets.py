"""What to sample from: a base model and optionally an adapter, found from a job (final, latest, a step)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.jobdir import checkpoints
from llm_mcp.core.layouts import LAYOUTS, layout_of
from llm_mcp.core.methods import get_method
from llm_mcp.core.store import FINAL_STATES, Job, JobStore


@dataclass(frozen=True)
class Target:
    """What to sample from: a base model, optionally with an adapter directory."""

    base_path: str
    base_id: str
    adapter_path: str | None = None
    quantized: bool = False  # QLoRA adapters are sampled on the 4-bit base they were trained on
    layout: str = "peft"  # how the adapter is stored (llm_mcp.core.layouts): 'peft' or 'sparse' deltas
    trust_remote_code: bool = False


def is_adapter_dir(path: Path) -> bool:
    return layout_of(path) is not None


def job_adapter(store: JobStore, job: Job, checkpoint: str | int = "final") -> tuple[Path, str]:
    """(adapter directory, label) for `checkpoint`: 'final', 'latest' or a step number.

    Raises:
        InvalidArgumentError: nothing to sample / export yet, or an unknown step (lists the ones there are).
    """
    if job.config.task == "evaluate":
        raise InvalidArgumentError(
            f"job {job.id} is an evaluation and has no adapter; use one of the jobs it scored "
            f"({', '.join(t.job_id for t in job.config.targets if t.job_id) or 'it scored the base model only'})"
        )
    job_dir = store.job_dir(job.id)
    final = job_dir / "adapter"
    steps = [step for step, p in checkpoints(job_dir) if (p / "adapter").is_dir()]
    value = str(checkpoint).strip().lower()
    if value == "final":
        if is_adapter_dir(final):
            return final, "final"
        if job.state in FINAL_STATES:
            raise InvalidArgumentError(_ended_without_adapter(job, steps))
        hint = f"use checkpoint='latest' (checkpoints at steps {steps})" if steps else "wait for its first checkpoint"
        raise InvalidArgumentError(f"job {job.id} is {job.state} and has no final adapter yet; {hint}")
    if value == "latest":
        if is_adapter_dir(final):
            return final, "final"
        if steps:
            return job_dir / "checkpoints" / f"step-{steps[-1]:06d}" / "adapter", f"step {steps[-1]}"
        if job.state in FINAL_STATES:
            raise InvalidArgumentError(_ended_without_adapter(job, steps))
        raise InvalidArgumentError(
            f"job {job.id} ({job.state}) has no checkpoint yet; checkpoints are written every "
            f"{job.config.checkpoint_every} steps. Try again after the first one."
        )
    if value.isdigit() and int(value) in steps:
        return job_dir / "checkpoints" / f"step-{int(value):06d}" / "adapter", f"step {int(value)}"
    raise InvalidArgumentError(
        f"checkpoint={checkpoint!r} for job {job.id}; allowed: 'final', 'latest' or a step in {steps}"
    )


def _ended_without_adapter(job: Job, steps: list[int]) -> str:
    """The error for a job that has ended (it will write nothing more) and has no final adapter."""
    if job.state == "succeeded":  # only if its adapter directory was removed since
        head = f"job {job.id} succeeded but its final adapter directory has been removed"
    else:
        head = f"job {job.id} {'failed' if job.state == 'failed' else 'was cancelled'} before writing a final adapter"
    if steps:
        return (
            f"{head}; its checkpoints hold adapters: use checkpoint='latest' or a step in {steps}, "
            f"or start_finetune with resume_from='{job.id}' to finish training"
        )
    cause = " (job_status shows the cause)" if job.state == "failed" else ""
    return f"{head} and has no checkpoint either, so there is nothing to use; start_finetune again{cause}"


def job_target(job: Job, adapter: Path | None) -> Target:
    model = job.training.model
    return Target(
        base_path=model.path,
        base_id=model.id,
        adapter_path=str(adapter) if adapter else None,
        quantized=job.training.quantized,
        layout=get_method(job.method).layout,
        trust_remote_code=model.trust_remote_code,
    )


def trained_on_4bit(adapter: Path) -> bool:
    """Whether an exported adapter says it was trained on a 4-bit base (QLoRA; export.json's quantized_base)."""
    try:
        return bool(json.loads((adapter / "export.json").read_text()).get("quantized_base"))
    except (OSError, ValueError, AttributeError):
        return False


def adapter_base(adapter: Path) -> str:
    """base_model_name_or_path from a PEFT (adapter_config.json) or sparse (sparse_config.json) adapter."""
    try:
        layout = layout_of(adapter)
        cfg = json.loads((adapter / (layout or LAYOUTS["peft"]).config_file).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"adapter={str(adapter)!r} is not an adapter directory (no readable adapter_config.json or "
            "sparse_config.json)"
        ) from exc
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise InvalidArgumentError(f"adapter={str(adapter)!r}: adapter_config.json names no base_model_name_or_path")
    return base
