"""Sparse fine-tuning: a trainable sparse delta over each frozen target weight, RigL-style updates.

Each target nn.Linear (or bitsandbytes Linear4bit) is wrapped by `SparseDeltaLinear`, which holds
the delta as sorted flat indices into the weight (row-major over [out, in], int64 buffer) and a
`values` parameter (fp32). No dense mask or dense delta is kept between steps.

Forward adds the delta into a transient copy of the (de-quantized) weight and runs one dense
matmul, so a step costs about what the base layer costs; backward rebuilds that copy rather than
keeping it (one extra weight per layer at a time, never per model) and gets d(values) by a sampled
dense-dense product at the active entries only (torch.sparse.sampled_addmm), not a dense weight
gradient.

Mask updates (use_rigl): every `mask_update_interval` steps, in each layer drop the fraction f_t of
active entries with the smallest |delta| and regrow as many where the |gradient of the loss w.r.t.
the dense delta| (summed over that step's micro-batches and processes) is largest, among the
entries that were not active; new entries start at zero, with zeroed Adam state. f_t decays with a
cosine: f_t = mask_update_fraction * (1 + cos(pi * t / T)) / 2 (RigL, Evci et al. 2020; on deltas as
in SpIEL, Ansell et al. 2024). Without use_rigl the random initial mask stays fixed (PEFT's SHiRA).

Regrowth candidates never hold a dense gradient for the model: in the backward of the update step,
each layer forms its own dense gradient (one layer at a time, freed at once) and keeps only the
CANDIDATES x n entries with the largest |gradient| among inactive ones (n = entries it may regrow),
as (index, gradient sum) pairs. A later micro-batch adds its exact gradient at the kept entries and
may bring in new ones (whose earlier micro-batches' share is then missing: an approximation only
when gradient_accumulation > 1); under DDP the processes' candidate sets are gathered and summed
per index. The estimate (core.shapes.rigl_bytes) counts one dense layer + every layer's set.

Saved layout (sparse_adapter.safetensors + sparse_config.json):
  "<module path>.indices"  int64 [k]  sorted flat indices into the [out_features, in_features] weight
  "<module path>.values"   float32 [k]  delta values at those indices
  sparse_config.json: {"format": "llm_mcp.sparse", "version": 1, "base_model_name_or_path",
                       "target_modules", "shapes": {module path: [out, in]}, "density", ...}
Merged weight = W + scatter(values at indices).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_mcp.core.layouts import LAYOUTS

CANDIDATES = 2  # regrowth candidates kept per entry a layer may regrow
SPARSE_WEIGHTS = LAYOUTS["sparse"].weights_file
SPARSE_CONFIG = LAYOUTS["sparse"].config_file


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense tensor (de-quantized for bitsandbytes 4-bit layers)."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    return w


class _SparseDeltaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, layer):
        w = _with_delta(dense_weight(layer.base), layer.indices, values)
        ctx.save_for_backward(x, values)
        ctx.layer = layer
        return nn.functional.linear(x, w, layer.base.bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        w = _with_delta(dense_weight(layer.base), layer.indices, values)
        grad_x = grad_out @ w.to(grad_out.dtype)
        del w  # one transient weight per layer, freed before the gradient work below
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
        x2 = x.reshape(-1, x.shape[-1]).float()
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": known, and fine here
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                layer.crow, layer.cols, torch.zeros_like(values), layer.shape, check_invariants=False
            )
        grad_values = torch.sparse.sampled_addmm(pattern, g2.t().contiguous(), x2, beta=0.0).values()
        if layer.grow_budget > 0:
            layer.observe_gradient(g2.t() @ x2)  # this layer's dense gradient only, dropped on return
        return grad_x, grad_values.to(values.dtype), None


def _with_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1).clone()
    flat.index_add_(0, indices, values.detach().to(flat.dtype))
    return flat.view(weight.shape)


class SparseDeltaLinear(nn.Module):
    """base(x) with W replaced by W + delta, delta sparse (indices + trainable values)."""

    def __init__(self, base: nn.Module, k: int, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        out_f, in_f = base.out_features, base.in_features
        self.shape = (out_f, in_f)
        k = max(1, min(k, out_f * in_f))
        idx = torch.randperm(out_f * in_f, generator=generator)[:k].sort().values
        self.indices: torch.Tensor
        self.register_buffer("indices", idx.to(base.weight.device))
        self.values = nn.Parameter(torch.zeros(k, device=base.weight.device, dtype=torch.float32))
        self.enabled = True
        self.grow_budget = 0  # > 0 during a mask-update step: entries the update may regrow
        self.cand_idx: torch.Tensor | None = None  # sorted flat indices of regrowth candidates (inactive entries)
        self.cand_val: torch.Tensor | None = None  # their gradient, summed over the step's micro-batches
        self.last_changed = 0
        # The CSR pattern (derived from indices) as non-persistent buffers: .to(device) and accelerate's
        # prepare move them with the values; they are not saved.
        self.register_buffer("crow", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("cols", torch.zeros(0, dtype=torch.int64), persistent=False)
        self._refresh_pattern()

    @property
    def k(self) -> int:
        return self.indices.numel()

    def _refresh_pattern(self) -> None:
        in_f = self.shape[1]
        rows = self.indices // in_f
        self.cols = (self.indices % in_f).contiguous()
        self.crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.indices.device)
        self.crow[1:] = torch.bincount(rows, minlength=self.shape[0]).cumsum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return _SparseDeltaFn.apply(x, self.values, self)

    def set_delta(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        order = indices.argsort()
        self.indices = indices[order].to(self.indices.device)
        with torch.no_grad():
            if values.numel() != self.values.numel():
                self.values = nn.Parameter(values[order].float().to(self.values.device))
            else:
                self.values.copy_(values[order])
        self._refresh_pattern()

    def collect_candidates(self, n_grow: int) -> None:
        """Start a mask-update step: the coming backward(s) keep regrowth candidates for `n_grow` entries."""
        self.grow_budget = max(0, min(n_grow, self.k, self.shape[0] * self.shape[1] - self.k))
        self.cand_idx = self.cand_val = None

    @torch.no_grad()
    def observe_gradient(self, dense: torch.Tensor) -> None:
        """Fold one micro-batch's dense d(loss)/d(delta) [out, in] into the candidate set (overwrites `dense`).

        Keeps the CANDIDATES x grow_budget inactive entries with the largest |summed gradient|.
        """
        if self.grow_budget <= 0:
            return
        flat = dense.reshape(-1)
        negative = flat.signbit()
        flat.abs_()  # in place: the scores, with the sign bits kept aside (1 byte per entry)
        flat[self.indices] = -1.0  # active entries are never regrown
        size = min(CANDIDATES * self.grow_budget, flat.numel() - self.k)
        top = torch.topk(flat, size, sorted=False).indices
        union = top.sort().values if self.cand_idx is None else torch.cat([self.cand_idx, top]).unique()
        union = union[flat[union] >= 0]
        vals = torch.where(negative[union], -flat[union], flat[union])
        if self.cand_idx is not None:  # earlier micro-batches' sums at the entries kept so far
            vals.index_add_(0, torch.searchsorted(union, self.cand_idx), self.cand_val)
        keep = torch.topk(vals.abs(), min(size, union.numel()), sorted=False).indices.sort().values
        self.cand_idx, self.cand_val = union[keep], vals[keep]

    @torch.no_grad()
    def update_mask(self, n_change: int, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Drop `n_change` smallest-|value| entries, regrow as many at the candidates' largest |gradient|.

        Regrowth considers only entries that were inactive before this update; new entries start at
        zero and their Adam moments are zeroed. Returns the number of entries changed.
        """
        if self.cand_idx is None:
            raise RuntimeError(
                "update_mask needs the candidates collected during the preceding step "
                "(collect_candidates before its backward)"
            )
        n_change = max(0, min(n_change, self.k, self.cand_idx.numel()))
        cand_idx, cand_val = self.cand_idx, self.cand_val
        self.cand_idx = self.cand_val = None
        self.grow_budget = 0
        if n_change == 0:
            self.last_changed = 0
            return 0
        drop = torch.topk(self.values.abs(), n_change, largest=False, sorted=False).indices
        keep = torch.ones(self.k, dtype=torch.bool, device=self.values.device)
        keep[drop] = False
        assert cand_val is not None, "candidates come with their gradient (collect_candidates)"
        grow = cand_idx[torch.topk(cand_val.abs(), n_change, sorted=False).indices].to(self.indices.device)
        new_indices = torch.cat([self.indices[keep], grow])
        order = new_indices.argsort()
        kept = int(keep.sum())
        sources = torch.cat([torch.nonzero(keep).flatten(), torch.full((n_change,), -1, device=keep.device)])[order]

        def remap(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(t)
            old = sources >= 0
            out[old] = t[sources[old]]
            return out

        self.values.copy_(remap(self.values))
        if optimizer is not None:
            state = optimizer.state.get(self.values, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].copy_(remap(state[key]))
        self.indices = new_indices[order]
        self._refresh_pattern()
        self.last_changed = n_change
        assert kept + n_change == self.k
        return n_change


def merge_candidates(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate sets of several processes, concatenated, as one: gradient sums per distinct index (sorted)."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    return unique, torch.zeros(unique.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def collect_candidates(sparse: dict[str, SparseDeltaLinear], fraction: float) -> None:
    """Before a mask-update step's micro-batches: each layer may regrow round(fraction * k) entries."""
    for module in sparse.values():
        module.collect_candidates(round(fraction * module.k))


@torch.no_grad()
def update_sparse_masks(sparse: dict[str, SparseDeltaLinear], optimizer, gather=None) -> int:
    """RigL step on every layer after the optimizer step. `gather` (accelerate's, under DDP) concatenates a
    tensor over processes: each layer's candidate sets are combined (O(candidates) each, never dense)."""
    changed = 0
    for module in sparse.values():
        if gather is not None and module.cand_idx is not None:
            module.cand_idx, module.cand_val = merge_candidates(gather(module.cand_idx), gather(module.cand_val))
        changed += module.update_mask(module.grow_budget, optimizer)
    return changed


def sparse_modules(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def entries_for(shape: tuple[int, int], density: float | str, rank: int) -> int:
    """Trainable entries in one [out, in] matrix: LoRA rank's count (rank*(in+out)) for 'auto'."""
    out_f, in_f = shape
    if density == "auto":
        return min(out_f * in_f, rank * (in_f + out_f))
    return max(1, round(float(density) * out_f * in_f))


def has_language_model(model: nn.Module) -> bool:
    """True for a vision-language model: its text layers live under a `language_model` submodule."""
    return any(".language_model." in name for name, _ in model.named_modules())


def attach_sparse_deltas(
    model: nn.Module, target_modules: list[str], density: float | str, rank: int, seed: int
) -> dict[str, SparseDeltaLinear]:
    """Freeze the model and wrap every target linear layer in a SparseDeltaLinear (in a vision-language
    model, those of its language model only: the vision tower has layers of the same names)."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    scoped = has_language_model(model)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if name.split(".")[-1] in target_modules
        and hasattr(m, "in_features")
        and hasattr(m, "weight")
        and (not scoped or ".language_model." in name)
    ]
    if not targets:
        raise ValueError(f"no linear layer named any of {target_modules} in this model")
    for name, module in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        shape = (module.out_features, module.in_features)
        setattr(parent, name.rsplit(".", 1)[-1], SparseDeltaLinear(module, entries_for(shape, density, rank), gen))
    return sparse_modules(model)


def cosine_fraction(base_fraction: float, step: int, total_steps: int) -> float:
    return base_fraction * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def save_sparse(model: nn.Module, out_dir: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    mods = sparse_modules(model)
    tensors = {}
    for name, m in mods.items():
        tensors[f"{name}.indices"] = m.indices.detach().cpu().contiguous()
        tensors[f"{name}.values"] = m.values.detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / SPARSE_WEIGHTS))
    total = sum(m.shape[0] * m.shape[1] for m in mods.values())
    config = {
        "format": "llm_mcp.sparse",
        "version": 1,
        **meta,
        "shapes": {name: list(m.shape) for name, m in mods.items()},
        "trainable_entries": sum(m.k for m in mods.values()),
        "density": sum(m.k for m in mods.values()) / max(1, total),
    }
    (out_dir / SPARSE_CONFIG).write_text(json.dumps(config, indent=2))


def load_sparse_state(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (indices, values)} from a saved sparse adapter directory."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / SPARSE_WEIGHTS))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}.indices"], tensors[f"{n}.values"]) for n in names}


def load_sparse_into(model: nn.Module, path: Path) -> None:
    mods = sparse_modules(model)
    for name, (indices, values) in load_sparse_state(path).items():
        mods[name].set_delta(indices, values)


@torch.no_grad()
def merge_sparse_into_weights(model: nn.Module, path: Path) -> None:
    """W += delta for each saved module, in place (the merged export)."""
    for name, (indices, values) in load_sparse_state(path).items():
        weight = model.get_submodule(name).weight
        weight.view(-1).index_add_(0, indices.to(weight.device), values.to(weight.dtype).to(weight.device))
