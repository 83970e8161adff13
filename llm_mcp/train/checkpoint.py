"""Checkpoints: adapter (PEFT format) + optimizer + scheduler + RNG (per rank) + step.

Written into `step-NNNNNN.tmp` and renamed when complete, so a crash mid-write never leaves a
half checkpoint that looks whole. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from llm_mcp.core.jobdir import checkpoints
from llm_mcp.modeling.adapters import adapter_in, adapter_of_method


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(model, out_dir: Path, meta: dict, state_dict: dict | None = None) -> None:
    """The adapter in its method's layout (meta["method"]; llm_mcp.modeling.adapters).

    `state_dict`: the trainable parameters gathered whole (FSDP, llm_mcp.train.fsdp.trainable_state)."""
    adapter_of_method(meta["method"]).save(model, out_dir, meta, state_dict)


def save_checkpoint(
    accelerator,
    model,
    optimizer,
    scheduler,
    job_dir: Path,
    step: int,
    meta: dict,
    keep: int,
    extra: dict[str, torch.Tensor | None] | None = None,
) -> Path:
    """Collective: every rank calls it. `extra`: tensors saved as files beside the state (None ones skipped).
    Returns the checkpoint directory."""
    from llm_mcp.train.fsdp import is_fsdp, trainable_state

    sharded = is_fsdp(accelerator)
    state = trainable_state(model) if sharded else None  # collective under FSDP
    final = job_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(accelerator, model, optimizer, scheduler, tmp, step, meta, state, sharded, extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half checkpoint left behind (a full disk, a kill)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in checkpoints(job_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(
    accelerator, model, optimizer, scheduler, tmp: Path, step: int, meta: dict, state, sharded: bool, extra
) -> None:
    """Every rank's part of a checkpoint into `tmp`."""
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if sharded:  # each rank holds its shard of the optimizer state
        torch.save(optimizer.state_dict(), tmp / f"optimizer_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), tmp / "adapter", meta, state)
        torch.save(
            {
                "optimizer": None if sharded else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
        for name, tensor in (extra or {}).items():
            if tensor is not None:
                torch.save(tensor, tmp / name)


def load_adapter_weights(model, ckpt: Path) -> None:
    """A checkpoint's adapter (or sparse deltas) into the model, before accelerate's prepare."""
    adapter_in(ckpt / "adapter").load_weights(model, ckpt / "adapter")


def load_checkpoint(accelerator, optimizer, scheduler, ckpt: Path) -> int:
    """Restore optimizer (this rank's shard under FSDP), scheduler and this rank's RNG; returns the step.

    Everything is read onto the CPU: saved from cuda:N, it would otherwise land on that device in every rank
    (the optimizer's load_state_dict then moves its state to each parameter's own device).
    """
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
    shard = ckpt / f"optimizer_{accelerator.process_index}.pt"
    optimizer.load_state_dict(
        torch.load(shard, weights_only=False, map_location="cpu") if state["optimizer"] is None else state["optimizer"]
    )
    scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt / f"rng_{accelerator.process_index}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False, map_location="cpu"))
    return int(state["step"])
