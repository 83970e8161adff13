"""DoRA, Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024): W = m * V / ||V||.

LoRA updates the direction V and the per-row magnitude m trains too (PEFT: LoraConfig(use_dora=True)).
Its dropout defaults to 0: with dropout PEFT's DoRA recomputes the base matmul in fp32 with an fp32 weight
copy kept for backward (counted: llm_mcp.bench.activations). vLLM cannot load the magnitude vectors, so a
DoRA result is served merged.
"""

from __future__ import annotations

from typing import Any

from llm_mcp.core.matrix import Dims
from llm_mcp.core.methods.base import LayerBytes, Method, TargetIO
from llm_mcp.core.shapes import dora_magnitude_count

DROPOUT_WEIGHT_BYTES = 7.3  # per adapted weight and layer with dropout > 0 (counted: llm_mcp.bench.activations)


class Dora(Method):
    name = "dora"
    title = "DoRA (Weight-Decomposed Low-Rank Adaptation)"
    short = "DoRA (Weight-Decomposed Low-Rank Adaptation)"
    family = "dora"
    use_dora = True
    fsdp = True

    def activation_bytes(self, io: TargetIO, rank: int, dropout: float, elem: int) -> LayerBytes:
        """LoRA's, plus what the magnitude rescaling keeps: each target's base output (16-bit) and its LoRA output
        (fp32), ~6.35 bytes per output feature as counted on Llama-3.1-8B and Qwen3-8B. With dropout > 0 PEFT
        recomputes the base matmul in fp32 and keeps fp32 weight copies for backward: 6.8-7.8 bytes per adapted
        weight per layer as counted, the reason configs/dora.yaml sets dropout 0."""
        lora = super().activation_bytes(io, rank, dropout, elem)
        per_token = lora.per_token + (elem + 4) * io.outputs
        if not dropout:
            return LayerBytes(per_token)
        return LayerBytes(per_token + 1.5 * io.outputs, fixed=DROPOUT_WEIGHT_BYTES * io.weights)

    def warnings(self, cfg: dict[str, Any], estimates: dict[str, Any]) -> list[str]:
        if not cfg["lora"]["dropout"]:
            return []
        return [
            f"lora_dropout={cfg['lora']['dropout']:g} with DoRA: PEFT then recomputes each adapted layer's base "
            "matmul in fp32 and keeps an fp32 copy of its weight for backward (about 8 bytes per adapted weight per "
            "layer, counted in this plan's memory) and runs several times slower; lora_dropout=0 (DoRA's default) "
            "avoids both"
        ]

    def trainable_params(
        self, dims: Dims, target_modules: list[str], rank: int, density: float | str, experts: bool
    ) -> int:
        lora = super().trainable_params(dims, target_modules, rank, density, experts)
        return lora + dora_magnitude_count(dims, target_modules)  # one magnitude per output row


DORA = Dora()
