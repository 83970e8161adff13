"""What FSDP changes in the trainer (configs/accelerate/fsdp.yaml; validation picks it when a LoRA / DoRA job
does not fit one GPU but fits sharded over several).

accelerate 1.15 runs FSDP only on accelerators: with `Accelerator(cpu=True)` it selects MULTI_CPU and ignores
the FSDP config (accelerate/state.py), so the CPU suite cannot exercise these paths; tests/test_gpu.py runs
a job under FSDP on one GPU. Under FSDP2 every parameter is a sharded DTensor and a forward is collective:
  - trainable parameters are gathered whole (adapter-sized, never the base) to save the adapter;
  - every rank runs the same forwards (eval rounds, the probe), or the others would wait forever;
  - the probe runs the inner model, past the root's forward hook: the root's own parameters (embeddings, final
    norm, LM head) are gathered for it first, as they are resharded after the last backward;
  - optimizer state is saved per rank (each holds its shard) and loaded back on the same layout;
  - adapter weights of a resumed job are loaded before `prepare`, so sharding spreads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP: every trainable parameter gathered whole, on CPU, by the model's own names."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().cpu()
    return out


def wrap_units(wrapped: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """FSDP's transformer wrap policy reads `_no_split_modules` from the module it is given (the loss wrapper):
    hand it the model's (its decoder layer class), so each layer is its own shard unit, not the whole model."""
    wrapped._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])
    return wrapped


@contextmanager
def unsharded_root(root) -> Iterator[None]:
    """The FSDP root's own parameters gathered whole while the block runs (None, or not FSDP2: nothing to do).
    The decoder layers are FSDP units of their own and gather themselves in their forward."""
    unshard = getattr(root, "unshard", None)
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        root.reshard()
