"""Sparse fine-tuning: a trainable sparse delta over each frozen target weight, with RigL mask updates.

Every `mask_update_interval` steps the smallest-|delta| fraction of active entries is dropped and as many
regrow where the gradient is largest (Evci et al. 2020; on deltas as in SpIEL, Ansell et al. 2024); without
use_rigl the random mask stays fixed (PEFT's SHiRA). density 'auto' matches LoRA's trainable count at the
configured rank. The layers are llm_mcp.modeling.sparse; its adapters have their own layout, which vLLM
cannot load, so results are served merged.
"""

from __future__ import annotations

from typing import Any

from llm_mcp.core.matrix import Dims
from llm_mcp.core.methods.base import LayerBytes, Method, TargetIO
from llm_mcp.core.methods.defaults import MethodDefaults
from llm_mcp.core.shapes import rigl_bytes, sparse_param_count


class Sparse(Method):
    name = "sparse"
    title = "Sparse fine-tuning (dynamic sparse deltas, RigL-style mask updates)"
    short = "Sparse (dynamic sparse delta)"
    layout = "sparse"
    family = "sparse"
    options = (
        "density",
        "sparsity_ratio",
        "sparsity_type",
        "mask_update_interval",
        "mask_update_fraction",
        "use_rigl",
        "quantize_base",
    )
    bytes_per_trainable = 32  # + the int64 flat index and the int64 CSR column of each entry

    def activation_bytes(self, io: TargetIO, rank: int, dropout: float, elem: int) -> LayerBytes:
        """Each sparse delta keeps its layer's input (the delta's gradient needs it), shared inputs once."""
        return LayerBytes(per_token=elem * io.distinct_inputs)

    def check(self, request: Any, entry: Any, problems: list[str]) -> None:
        if request.density is not None and request.sparsity_ratio is not None:
            problems.append("give density or sparsity_ratio (= 1 - density), not both")
        if request.quantize_base and entry is not None and entry.methods["qlora"].status == "unsupported":
            problems.append(
                f"quantize_base=true needs a 4-bit base, which {entry.id} does not support "
                f"(qlora: {entry.methods['qlora'].note})"
            )

    def quantized(self, request: Any) -> bool:
        return bool(request.quantize_base)

    def job_settings(self, request: Any, defaults: dict[str, MethodDefaults]) -> dict[str, Any]:
        """density: explicit, or 1 - sparsity_ratio (seed 002's knob), or the configured default ('auto')."""
        own = defaults[self.name].sparse
        assert own is not None, "configs/sparse.yaml has a sparse section (load_method_defaults checks it)"
        density = request.density
        if density is None and request.sparsity_ratio is not None:
            density = round(1.0 - request.sparsity_ratio, 6)
        if density is None:
            density = own.density if own.sparsity_ratio is None else round(1 - own.sparsity_ratio, 6)
        pick = lambda value, default: default if value is None else value  # noqa: E731
        sparse = {
            "density": density,
            "sparsity_type": "unstructured",
            "mask_update_interval": pick(request.mask_update_interval, own.mask_update_interval),
            "mask_update_fraction": pick(request.mask_update_fraction, own.mask_update_fraction),
            "use_rigl": pick(request.use_rigl, own.use_rigl),
            "quantize_base": bool(request.quantize_base),
        }
        return {**super().job_settings(request, defaults), "sparse": sparse}

    def estimate_density(self, settings: dict[str, Any] | None, defaults: MethodDefaults) -> float | str:
        return settings["density"] if settings else "auto"

    def rigl_fraction(self, settings: dict[str, Any] | None, defaults: MethodDefaults) -> float:
        if settings is not None:
            return settings["mask_update_fraction"] if settings["use_rigl"] else 0.0
        own = defaults.sparse
        return own.mask_update_fraction if own is not None and own.use_rigl else 0.0

    def trainable_params(
        self, dims: Dims, target_modules: list[str], rank: int, density: float | str, experts: bool
    ) -> int:
        return sparse_param_count(dims, target_modules, density, rank)

    def extra_bytes(self, dims: Dims, target_modules: list[str], trainable: int, rigl_fraction: float) -> float:
        return rigl_bytes(dims, target_modules, trainable, rigl_fraction) if rigl_fraction > 0 else 0.0


SPARSE = Sparse()
