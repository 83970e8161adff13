"""LoRA: W' = W + (alpha / rank) * B @ A over a frozen base; B and A train (Hu et al. 2021)."""

from __future__ import annotations

from llm_mcp.core.methods.base import Method


class Lora(Method):
    name = "lora"
    title = "LoRA (low-rank adapters)"
    short = "LoRA"
    trains_experts = True
    fsdp = True
    vllm_adapter = True
    gguf_adapter = True


LORA = Lora()
