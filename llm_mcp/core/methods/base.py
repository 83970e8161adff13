"""What a fine-tuning method is: the `Method` every method module subclasses.

The base class is LoRA's behaviour; a method sets its facts and overrides the hooks where it differs.
Hooks take plain values (dims, the request, the defaults), so the server calls them without torch; the
torch side of a method is its adapter layout's (llm_mcp.modeling.adapters, keyed by `layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from llm_mcp.core.experts import expert_param_count, expert_targets
from llm_mcp.core.jobconfig import QuantizationSettings
from llm_mcp.core.shapes import NF4_BYTES_PER_PARAM, embedding_param_count, lora_param_count

if TYPE_CHECKING:
    from llm_mcp.core.matrix import Dims
    from llm_mcp.core.methods.defaults import MethodDefaults


@dataclass(frozen=True)
class LayerBytes:
    """Activation bytes one decoder layer keeps for backward: per token, and a part the tokens do not change."""

    per_token: float
    fixed: float = 0.0


@dataclass(frozen=True)
class TargetIO:
    """What a layer's adapted linear layers read and write (per layer, averaged over the layers)."""

    summed_inputs: float  # sum of in_features over the targets: each target's own copy of its input
    distinct_inputs: float  # the inputs they share counted once (q/k/v read one, gate/up one); o_proj's excluded
    outputs: float  # sum of out_features
    weights: float  # sum of in_features x out_features
    count: float  # targets


class Method:
    """One fine-tuning method: its facts, its part of a job config and its memory-estimate terms."""

    name: ClassVar[str]
    title: ClassVar[str]  # list_models and tool descriptions: "LoRA (low-rank adapters)"
    short: ClassVar[str]  # model cards: "LoRA"
    layout: ClassVar[str] = "peft"  # how its adapter is stored (llm_mcp.core.layouts / llm_mcp.modeling.adapters)
    family: ClassVar[str] = "lora"  # init_from continues an adapter of the same family
    quantized_base: ClassVar[bool] = False  # the base is always loaded in 4-bit NF4
    use_dora: ClassVar[bool] = False  # PEFT's use_dora flag
    trains_experts: ClassVar[bool] = False  # also adapts fused MoE expert parameters (PEFT target_parameters)
    fsdp: ClassVar[bool] = False  # can shard over GPUs with FSDP (llm_mcp.train.fsdp)
    vllm_adapter: ClassVar[bool] = False  # vLLM serves the result as a LoRA adapter (else a merged model)
    gguf_adapter: ClassVar[bool] = False  # llama.cpp applies the adapter as a GGUF LoRA (else only merged GGUF)
    options: ClassVar[tuple[str, ...]] = ()  # FinetuneRequest fields only this method takes
    bytes_per_trainable: ClassVar[int] = 16  # fp32 value + grad + two Adam moments

    def check(self, request: Any, entry: Any, problems: list[str]) -> None:
        """Problems with this method's own options for `entry` (a ModelEntry, or None if the model is unknown)."""

    def quantized(self, request: Any) -> bool:
        """Whether this request trains over a 4-bit base."""
        return self.quantized_base

    def job_settings(self, request: Any, defaults: dict[str, MethodDefaults]) -> dict[str, Any]:
        """The job config's method-specific sections: quantization and sparse (None where unused)."""
        quantization = None
        if self.quantized(request):
            quantization = (defaults[self.name].quantization or QuantizationSettings()).model_dump()
        return {"quantization": quantization, "sparse": None}

    def estimate_density(self, settings: dict[str, Any] | None, defaults: MethodDefaults) -> float | str:
        """The sparse density the estimate uses ('auto' where the method is not sparse)."""
        return "auto"

    def rigl_fraction(self, settings: dict[str, Any] | None, defaults: MethodDefaults) -> float:
        """The largest fraction of entries a mask update changes (0: the method has no mask updates)."""
        return 0.0

    # Memory-estimate terms (llm_mcp.core.estimates), in bytes or counts.

    def weights_bytes(self, dims: Dims, total_params: float, elem: int, quantized: bool) -> float:
        """The base weights as training holds them: `elem` bytes each, or 4-bit NF4 linear layers (embeddings and
        fused MoE experts stay 16-bit: bitsandbytes quantizes linear layers only)."""
        if not quantized:
            return total_params * elem
        embed = embedding_param_count(dims)
        experts = min(expert_param_count(dims), max(total_params - embed, 0))
        linear = max(total_params - embed - experts, 0)
        return linear * NF4_BYTES_PER_PARAM + experts * elem + embed * self.embedding_bytes(elem)

    def embedding_bytes(self, elem: int) -> int:
        """Bytes per embedding / LM-head weight over a 4-bit base."""
        return elem

    def trainable_params(
        self, dims: Dims, target_modules: list[str], rank: int, density: float | str, experts: bool
    ) -> int:
        """Trainable parameters: rank x sum(in + out) over the targets (and the experts it adapts)."""
        return lora_param_count(dims, target_modules + expert_targets(dims, experts), rank)

    def activation_bytes(self, io: TargetIO, rank: int, dropout: float, elem: int) -> LayerBytes:
        """What the adapters add to a layer's saved activations (counted: llm_mcp.bench.activations).

        PEFT casts each adapted layer's input to the fp32 adapter dtype (a copy per target when the model is 16-bit;
        with fp32 weights the shared inputs stay shared) and keeps lora_A's r-wide output; dropout > 0 keeps each
        target's dropped-out input too.
        """
        kept = io.summed_inputs if dropout or elem < 4 else io.distinct_inputs
        copies = (8 if dropout else 4) * kept
        return LayerBytes(per_token=copies + 4 * rank * io.count)

    def extra_bytes(self, dims: Dims, target_modules: list[str], trainable: int, rigl_fraction: float) -> float:
        """Memory beyond the weights, trainable state and activations (sparse: RigL's buffers)."""
        return 0.0

    def warnings(self, cfg: dict[str, Any], estimates: dict[str, Any]) -> list[str]:
        """What the caller should know about this job's settings for this method (the plan is in `estimates`)."""
        return []

    def card_notes(self, quantized: bool) -> list[str]:
        """Lines a model card adds about how this method trained."""
        return []
