"""Parameter counts from config dims, without loading a model: which matrices a target name hits and how
many trainable parameters a LoRA, DoRA or sparse adapter on them has (LoRA: rank x sum(in + out) over the
adapted matrices, REFERENCE section 2). The memory estimate built on them is llm_mcp.core.estimates.
"""

from __future__ import annotations

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.experts import expert_shapes
from llm_mcp.core.matrix import Dims

GiB = 1024**3
NF4_BYTES_PER_PARAM = 4.127 / 8  # 4-bit values + double-quantized absmax per 64-block


def module_shapes(dims: Dims, module: str) -> list[tuple[int, int, int]]:
    """(in_features, out_features, count in the whole model) for each matrix a target name hits.

    Raises:
        InvalidArgumentError: the module name does not exist in this architecture.
    """
    h, n_layers = dims.hidden_size, dims.num_layers
    heads, kv, hd = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    mla = dims.kv_lora_rank is not None
    moe_layers = n_layers - dims.dense_layers if dims.num_experts else 0
    dense_mlp_layers = n_layers - moe_layers

    if mla:
        nope, rope, v = dims.qk_nope_head_dim or 0, dims.qk_rope_head_dim or 0, dims.v_head_dim or hd
        q_out = heads * (nope + rope)
        table = {
            "q_a_proj": [(h, dims.q_lora_rank or 0, n_layers)] if dims.q_lora_rank else [],
            "q_b_proj": [(dims.q_lora_rank or 0, q_out, n_layers)] if dims.q_lora_rank else [],
            "q_proj": [] if dims.q_lora_rank else [(h, q_out, n_layers)],
            "kv_a_proj_with_mqa": [(h, (dims.kv_lora_rank or 0) + rope, n_layers)],
            "kv_b_proj": [(dims.kv_lora_rank or 0, heads * (nope + v), n_layers)],
            "o_proj": [(heads * v, h, n_layers)],
        }
    else:
        table = {
            "q_proj": [(h, heads * hd, n_layers)],
            "k_proj": [(h, kv * hd, n_layers)],
            "v_proj": [(h, kv * hd, n_layers)],
            "o_proj": [(heads * hd, h, n_layers)],
            "query_key_value": [(h, (heads + 2 * kv) * hd, n_layers)],
            "dense": [(heads * hd, h, n_layers)],
        }
    mlp: list[tuple[int, int, int]] = []  # (width, count) pairs for gate/up/down
    if dims.intermediate_size and dense_mlp_layers:
        mlp.append((dims.intermediate_size, dense_mlp_layers, 0))
    if dims.num_shared_experts and moe_layers:
        mlp.append(((dims.moe_intermediate_size or 0) * dims.num_shared_experts, moe_layers, 0))
    for name in ("gate_proj", "up_proj", "dense_h_to_4h"):
        table[name] = [(h, width, count) for width, count, _ in mlp]
    for name in ("down_proj", "dense_4h_to_h"):
        table[name] = [(width, h, count) for width, count, _ in mlp]

    table.update(expert_shapes(dims))
    shapes = table.get(module)
    if shapes is None or not shapes:
        known = sorted(k for k, v in table.items() if v)
        raise InvalidArgumentError(
            f"target_modules contains {module!r}, which this architecture does not have as a linear layer; "
            f"allowed: {known}"
        )
    return shapes


def linear_names(dims: Dims, hf_architecture: str) -> list[str]:
    """The linear-layer names LoRA can target in this architecture, in model order."""
    if hf_architecture.startswith("Falcon"):
        return ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    if dims.kv_lora_rank is not None:  # DeepSeek-V3 / Kimi-K2: PEFT 0.21 maps the names gate_proj / up_proj /
        # down_proj on this architecture onto the fused experts (their transformers-4 names), so the dense and
        # shared-expert MLPs cannot be targeted by name: attention only
        query = ["q_a_proj", "q_b_proj"] if dims.q_lora_rank else ["q_proj"]
        return query + ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    has_mlp = (dims.intermediate_size and (not dims.num_experts or dims.dense_layers)) or dims.num_shared_experts
    return attn + (["gate_proj", "up_proj", "down_proj"] if has_mlp else [])


def lora_param_count(dims: Dims, target_modules: list[str], rank: int) -> int:
    """LoRA trainable parameters: rank x sum(in + out) over every adapted matrix."""
    total = 0
    for module in target_modules:
        for n_in, n_out, count in module_shapes(dims, module):
            total += rank * (n_in + n_out) * count
    return total


def sparse_param_count(dims: Dims, target_modules: list[str], density: float | str, rank: int) -> int:
    """Sparse-delta entries: per matrix rank*(in+out) for density 'auto' (LoRA's count), else density*in*out."""
    total = 0
    for module in target_modules:
        for n_in, n_out, count in module_shapes(dims, module):
            per = (
                min(n_in * n_out, rank * (n_in + n_out)) if density == "auto" else round(float(density) * n_in * n_out)
            )
            total += max(1, per) * count
    return total


def dora_magnitude_count(dims: Dims, target_modules: list[str]) -> int:
    """DoRA's extra trainable magnitude vector: one value per output row of each adapted matrix."""
    return sum(n_out * count for m in target_modules for _, n_out, count in module_shapes(dims, m))


def embedding_param_count(dims: Dims) -> int:
    return dims.vocab_size * dims.hidden_size * (1 if dims.tie_word_embeddings else 2)


def rigl_bytes(dims: Dims, target_modules: list[str], entries: int, fraction: float) -> float:
    """A RigL mask update's extra memory (llm_mcp.modeling.sparse): one layer's dense fp32 gradient + its sign
    bits at a time (the largest target matrix), and per layer a candidate set of 2 x the entries it may
    regrow (int64 index + fp32 gradient sum) over the step."""
    largest = max(n_in * n_out for m in target_modules for n_in, n_out, _ in module_shapes(dims, m))
    return largest * 5 + 2 * fraction * entries * 12
