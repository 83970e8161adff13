"""Mixture-of-experts models: which fused expert parameters LoRA adapts, and what they cost.

In transformers 5 every MoE architecture the matrix names (Qwen3-MoE, Qwen3-VL-MoE, Mixtral, gpt-oss,
DeepSeek-V3 / Kimi-K2) keeps a layer's experts as two 3-D parameters, `mlp.experts.gate_up_proj`
[E, 2I, H] and `mlp.experts.down_proj`, not as linear layers. PEFT (>= 0.20) adapts them through
`target_parameters` with a rank-r pair per expert (lora_A [r*E, in], lora_B [out, r*E]); it does not
support lora_dropout or DoRA there. So LoRA and QLoRA train attention *and* experts by default (the
router stays frozen), with lora_dropout 0; DoRA and sparse adapt the attention (and any dense MLP)
only and say so. bitsandbytes quantizes linear layers only: under QLoRA the experts stay 16-bit.
"""

from __future__ import annotations

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def expert_targets(dims, adapted: bool = True) -> list[str]:
    """The expert parameters adapted on a model with these dims when `adapted` ([] for dense models): a method
    that trains experts (Method.trains_experts) and a request that wants them (train_experts)."""
    return list(EXPERT_PARAMETERS) if dims.num_experts and adapted else []


def expert_param_count(dims) -> int:
    """Parameters in every routed expert of the model (gate, up and down per expert per MoE layer)."""
    if not dims.num_experts:
        return 0
    moe_layers = dims.num_layers - dims.dense_layers
    return moe_layers * dims.num_experts * 3 * dims.hidden_size * (dims.moe_intermediate_size or 0)


def expert_shapes(dims) -> dict[str, list[tuple[int, int, int]]]:
    """(in, out, count) per expert parameter, counted per expert: LoRA's rank applies to each expert."""
    if not dims.num_experts:
        return {}
    count = (dims.num_layers - dims.dense_layers) * dims.num_experts
    h, inter = dims.hidden_size, dims.moe_intermediate_size or 0
    return {"mlp.experts.gate_up_proj": [(h, 2 * inter, count)], "mlp.experts.down_proj": [(inter, h, count)]}


def check_experts(entry, method, request, problems: list[str], warnings: list[str]) -> list[str]:
    """The expert parameters this request adapts (`method` a llm_mcp.core.methods.Method); its lora_dropout and
    train_experts checked against them."""
    if entry is None or not entry.dims.num_experts:
        if request.train_experts:
            problems.append(
                f"train_experts=true: {entry.id if entry else 'the model'} is not a mixture-of-experts "
                "model; leave train_experts out"
            )
        return []
    wanted = request.train_experts is not False
    targets = expert_targets(entry.dims, method.trains_experts and wanted)
    if wanted and not targets:
        warnings.append(
            f"{method.name} adapts attention (and any dense MLP) only on {entry.id}: its "
            f"{entry.dims.num_experts} experts per layer stay frozen (PEFT adapts fused expert "
            "parameters with LoRA / QLoRA only)"
        )
    if targets and request.lora_dropout:
        problems.append(
            f"lora_dropout={request.lora_dropout!r}: PEFT trains the experts of {entry.id} without "
            "dropout; give lora_dropout=0, or train_experts=false to adapt attention only"
        )
    return targets
