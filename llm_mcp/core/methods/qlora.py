"""QLoRA: LoRA over a base quantized to 4-bit NF4 with double quantization (Dettmers et al. 2023).

PEFT's prepare_model_for_kbit_training upcasts the embeddings and LM head to fp32, so they cost 4 bytes
each; merging into the 4-bit base would round (PEFT #2321), so merged exports de-quantize it first.
"""

from __future__ import annotations

from llm_mcp.core.methods.base import Method


class QLora(Method):
    name = "qlora"
    title = "QLoRA (LoRA over a 4-bit NF4 base)"
    short = "QLoRA"
    quantized_base = True
    trains_experts = True
    vllm_adapter = True  # on the full-precision base: outputs differ slightly from the 4-bit model's
    gguf_adapter = True

    def embedding_bytes(self, elem: int) -> int:
        return 4

    def card_notes(self, quantized: bool) -> list[str]:
        return ["- base quantized to 4-bit NF4 (double quantization) during training"]


QLORA = QLora()
