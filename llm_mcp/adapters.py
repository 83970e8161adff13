"""Find a job's adapter (final, latest or a checkpoint step) and what base it belongs to."""

from __future__ import annotations

import json
from pathlib import Path

from llm_mcp.errors import InvalidArgumentError
from llm_mcp.jobs.store import Job, JobStore
from llm_mcp.sampling import Target


def _steps(job_dir: Path) -> list[int]:
    root = job_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-[0-9]*[0-9]") if (p / "adapter").is_dir())


def job_adapter(store: JobStore, job: Job, checkpoint: str | int = "final") -> tuple[Path, str]:
    """(adapter directory, label) for `checkpoint`: 'final', 'latest' or a step number.

    Raises:
        InvalidArgumentError: nothing to sample / export yet, or an unknown step (lists the ones there are).
    """
    job_dir = store.job_dir(job.id)
    final = job_dir / "adapter"
    steps = _steps(job_dir)
    value = str(checkpoint).strip().lower()
    if value == "final":
        if (final / "adapter_config.json").exists():
            return final, "final"
        hint = f"use checkpoint='latest' (checkpoints at steps {steps})" if steps else "wait for its first checkpoint"
        raise InvalidArgumentError(f"job {job.id} is {job.state} and has no final adapter yet; {hint}")
    if value == "latest":
        if (final / "adapter_config.json").exists():
            return final, "final"
        if steps:
            return job_dir / "checkpoints" / f"step-{steps[-1]:06d}" / "adapter", f"step {steps[-1]}"
        raise InvalidArgumentError(
            f"job {job.id} ({job.state}) has no checkpoint yet; checkpoints are written every "
            f"{job.config.get('checkpoint_every')} steps. Try again after the first one.")
    if value.isdigit() and int(value) in steps:
        return job_dir / "checkpoints" / f"step-{int(value):06d}" / "adapter", f"step {int(value)}"
    raise InvalidArgumentError(
        f"checkpoint={checkpoint!r} for job {job.id}; allowed: 'final', 'latest' or a step in {steps}")


def job_target(job: Job, adapter: Path | None) -> Target:
    model = job.config["model"]
    return Target(base_path=model["path"], base_id=model["id"], adapter_path=str(adapter) if adapter else None,
                  quantized=job.method == "qlora", trust_remote_code=model.get("trust_remote_code", False))


def adapter_base(adapter: Path) -> str:
    """base_model_name_or_path from a PEFT adapter directory."""
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"adapter={str(adapter)!r} is not a PEFT adapter directory (no readable adapter_config.json)") from exc
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise InvalidArgumentError(f"adapter={str(adapter)!r}: adapter_config.json names no base_model_name_or_path")
    return base
