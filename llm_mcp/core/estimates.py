"""Parameter and memory estimates from config dims, without loading a model.

LoRA trainable parameters follow REFERENCE §2: rank x sum(in + out) over the adapted
matrices. Memory is a sum of parts that each have a reason:

  weights      base weights in their training dtype (bf16 on GPU, fp32 on CPU;
               QLoRA: linear weights as 4-bit NF4 with double quantization, ~4.13 bits)
  trainable    adapter params x 16 bytes (fp32 value + grad + two Adam moments); sparse deltas
               x 32 (+ int64 index and int64 CSR column) plus RigL's candidate buffers
  activations  ~34*h bytes/token per layer in 16-bit (Korthikanti et al. 2022, SDPA so no s^2
               term): with gradient checkpointing each layer's input kept and one layer
               recomputed, without it every layer's; plus fp32 logits and their gradient
               (batch x seq x vocab x 8 bytes)
  overhead     runtime context (CUDA context / Python + torch) and 5% fragmentation
DoRA adds ~10% (PEFT's own benchmark: 1.10x LoRA memory). QLoRA's embeddings and LM head are fp32
(prepare_model_for_kbit_training upcasts them). Estimates are per process: under FSDP (`shards`)
weights and optimizer state are split, activations are not. These are planning numbers, not
guarantees: the job's measured peak memory is what counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.experts import expert_param_count, expert_shapes, expert_targets
from llm_mcp.core.matrix import Dims

GiB = 1024**3
Device = Literal["cuda", "cpu"]

# Standard GPU memory sizes (GB) a minimum is rounded up to; beyond 80 GB: multiples of 80.
GPU_CLASSES_GB = (8, 12, 16, 24, 40, 48, 80)
GPU_USABLE_FRACTION = 0.95  # of a GPU's memory a job may plan on (the rest: fragmentation, other processes)
RAM_USABLE_FRACTION = 0.85  # of total RAM on CPU-only machines
NF4_BYTES_PER_PARAM = 4.127 / 8  # 4-bit values + double-quantized absmax per 64-block
DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH = 1


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
            "kv_a_proj_with_mqa": [(h, dims.kv_lora_rank + rope, n_layers)],
            "kv_b_proj": [(dims.kv_lora_rank, heads * (nope + v), n_layers)],
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


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gb: float
    trainable_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float
    trainable_params: int
    device: Device
    gradient_checkpointing: bool = True
    shards: int = 1  # FSDP processes the weights and optimizer state are split over (1: a whole replica)

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


def activation_bytes(dims: Dims, tokens: int, elem: int, gradient_checkpointing: bool) -> float:
    """Activations kept for the backward, per process, plus the fp32 logits and their gradient.

    One layer's forward keeps ~17 hidden-sized tensors per token for its backward (34*h bytes in 16-bit,
    Korthikanti et al. 2022, SDPA so no s^2 term). With checkpointing only each layer's input is kept and
    one layer at a time is recomputed: L + 17 of them; without it all L layers keep theirs: 17 * L.
    """
    per_token = dims.num_layers + 17 if gradient_checkpointing else 17 * dims.num_layers
    return tokens * dims.hidden_size * elem * per_token + tokens * dims.vocab_size * 8


def estimate_memory(
    dims: Dims,
    params_b: float,
    method: str,
    *,
    target_modules: list[str],
    rank: int = 32,
    batch_size: int = DEFAULT_BATCH,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: Device = "cuda",
    quantized: bool = False,
    density: float | str = "auto",
    gradient_checkpointing: bool = True,
    shards: int = 1,
    rigl_fraction: float = 0.0,
    train_experts: bool = True,
) -> MemoryEstimate:
    """Estimate peak training memory (GB = 2**30 bytes) for one process.

    `quantized` puts a 4-bit base under any method (sparse over NF4); `density` is the sparse
    method's trained fraction per matrix ('auto' = LoRA rank's count). `shards` > 1: FSDP over that
    many processes (weights and optimizer state split; the layer being computed, and the next one
    prefetched, gathered whole). `rigl_fraction`: sparse mask updates' largest drop fraction (0: none).
    `train_experts`: LoRA / QLoRA on an MoE model also adapt its experts (llm_mcp.core.experts).
    """
    elem = 2 if device == "cuda" else 4  # bf16 on GPU; fp32 on CPU where bf16 matmuls are slow
    total_params = params_b * 1e9
    embed = embedding_param_count(dims)
    if method == "qlora" or quantized:
        # prepare_model_for_kbit_training (QLoRA) upcasts the embeddings and LM head to fp32; bitsandbytes
        # quantizes linear layers only, so fused MoE experts stay 16-bit
        experts = min(expert_param_count(dims), max(total_params - embed, 0))
        weights = (
            max(total_params - embed - experts, 0) * NF4_BYTES_PER_PARAM
            + experts * elem
            + embed * (4 if method == "qlora" else elem)
        )
    else:
        weights = total_params * elem

    if method == "sparse":
        lora = sparse_param_count(dims, target_modules, density, rank)
    else:
        lora = lora_param_count(dims, target_modules + expert_targets(dims, method, train_experts), rank)
    trainable_params = lora + (dora_magnitude_count(dims, target_modules) if method == "dora" else 0)
    # fp32 value + grad + two Adam moments; sparse deltas add their int64 flat index and int64 CSR column.
    trainable = trainable_params * (32 if method == "sparse" else 16)
    if method == "sparse" and rigl_fraction > 0:
        trainable += rigl_bytes(dims, target_modules, trainable_params, rigl_fraction)

    activations = activation_bytes(dims, batch_size * seq_len, elem, gradient_checkpointing)
    if expert_targets(dims, method, train_experts):
        # PEFT adds each expert's LoRA delta to a copy of the layer's fused expert weights (ParamWrapper), which
        # the expert matmuls keep for backward: one layer's copy (and the recomputed one) under checkpointing,
        # every layer's without it
        copy = expert_param_count(dims) * elem
        activations += 2 * copy / max(1, dims.num_layers - dims.dense_layers) if gradient_checkpointing else copy
    if method == "dora":
        activations *= 1.25  # the weight-norm path keeps extra tensors (PEFT: ~1.10x total)
    if shards > 1:
        per_layer = max(weights - embed * elem, 0) / max(1, dims.num_layers)
        weights = weights / shards + 2 * per_layer
        trainable = trainable / shards

    context = 1.0 * GiB if device == "cuda" else 0.5 * GiB
    body = weights + trainable + activations
    overhead = context + 0.05 * body
    to_gb = lambda b: round(b / GiB, 2)  # noqa: E731
    return MemoryEstimate(
        weights_gb=to_gb(weights),
        trainable_gb=to_gb(trainable),
        activations_gb=to_gb(activations),
        overhead_gb=to_gb(overhead),
        total_gb=to_gb(body + overhead),
        trainable_params=trainable_params,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        shards=shards,
    )


def rigl_bytes(dims: Dims, target_modules: list[str], entries: int, fraction: float) -> float:
    """A RigL mask update's extra memory (llm_mcp.train.sparse): one layer's dense fp32 gradient + its sign
    bits at a time (the largest target matrix), and per layer a candidate set of 2 x the entries it may
    regrow (int64 index + fp32 gradient sum) over the step."""
    largest = max(n_in * n_out for m in target_modules for n_in, n_out, _ in module_shapes(dims, m))
    return largest * 5 + 2 * fraction * entries * 12


def gpu_class_gb(total_gb: float) -> int:
    """Round a memory need up to a standard GPU size (GB), or to a multiple of 80 GB beyond one GPU."""
    for size in GPU_CLASSES_GB:
        if total_gb <= size * GPU_USABLE_FRACTION:
            return size
    return 80 * math.ceil(total_gb / (80 * GPU_USABLE_FRACTION))
