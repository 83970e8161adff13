"""Parameter and memory estimates from config dims, without loading a model.

LoRA trainable parameters follow REFERENCE §2: rank x sum(in + out) over the adapted
matrices. Memory is a sum of parts that each have a reason:

  weights      base weights in their training dtype (bf16 on GPU, fp32 on CPU;
               QLoRA: linear weights as 4-bit NF4 with double quantization, ~4.13 bits)
  trainable    adapter params x 16 bytes (fp32 value + grad + two Adam moments); sparse deltas
               x 32 (+ int64 index and int64 CSR column) plus RigL's candidate buffers
  activations  what autograd keeps for backward, per layer: the frozen block's tensors plus each
               method's (`Method.activation_bytes`), both counted with saved-tensor hooks at real
               layer widths (llm_mcp.bench.activations; tests/test_estimates.py keeps them within
               15%). With gradient checkpointing each layer keeps its input and one layer is
               recomputed at a time; without it every layer keeps its set. Plus the logits at the
               loss (16-bit logits, fp32 log-softmax and two gradients: 14 bytes per vocabulary entry)
  overhead     runtime context (CUDA context / Python + torch) and 5% fragmentation
QLoRA's embeddings and LM head are fp32 (prepare_model_for_kbit_training upcasts them). Estimates
are per process: under FSDP (`shards`) weights and optimizer state are split, activations are not.
These are planning numbers, not guarantees: the job's measured peak memory is what counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from llm_mcp.core.experts import expert_param_count, expert_targets
from llm_mcp.core.matrix import Dims
from llm_mcp.core.methods import Method, get_method
from llm_mcp.core.methods.base import LayerBytes, TargetIO
from llm_mcp.core.shapes import GiB, embedding_param_count, module_shapes

Device = Literal["cuda", "cpu"]

# Standard GPU memory sizes (GB) a minimum is rounded up to; beyond 80 GB: multiples of 80.
GPU_CLASSES_GB = (8, 12, 16, 24, 40, 48, 80)
GPU_USABLE_FRACTION = 0.95  # of a GPU's memory a job may plan on (the rest: fragmentation, other processes)
RAM_USABLE_FRACTION = 0.85  # of total RAM on CPU-only machines
DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH = 1


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


# Targets that read the same tensor: a frozen base keeps none of them, an adapter keeps each group's input once
# (fp32 model) or each target's own fp32 copy (16-bit model). o_proj's input is the attention output, which the
# attention kernel keeps anyway.
SHARED_INPUT = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "query_key_value": "attn_in",
    "q_a_proj": "attn_in", "kv_a_proj_with_mqa": "attn_in", "o_proj": "attn_out", "dense": "attn_out",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "dense_h_to_4h": "mlp_in",
}  # fmt: skip
LOGIT_BYTES = {2: 14, 4: 16}  # per position and vocabulary entry at the loss: logits, fp32 log-softmax, two grads


def target_io(dims: Dims, target_modules: list[str]) -> TargetIO:
    """What the targeted linear layers of one layer (on average) read and write."""
    layers = dims.num_layers
    summed = outputs = weights = count = 0.0
    groups: dict[str, float] = {}
    for name in target_modules:
        for fan_in, fan_out, n in module_shapes(dims, name):
            summed += fan_in * n / layers
            outputs += fan_out * n / layers
            weights += fan_in * fan_out * n / layers
            count += n / layers
            group = SHARED_INPUT.get(name, name)
            if group != "attn_out":
                groups[group] = groups.get(group, 0.0) + fan_in * n / layers
    distinct = sum(size / max(1, sum(1 for t in target_modules if SHARED_INPUT.get(t, t) == g))
                   for g, size in groups.items())  # fmt: skip
    return TargetIO(summed, distinct, outputs, weights, count)


def base_layer_bytes(dims: Dims, elem: int, seq_len: int) -> float:
    """Bytes per token one frozen decoder layer keeps for backward (counted: llm_mcp.bench.activations).

    The SwiGLU MLP keeps gate, up and act(gate) (an MoE layer: for each routed and shared expert, plus the router's
    fp32 logits); each RMSNorm keeps its fp32 input (Qwen3 and Gemma 3 also normalize each head's q and k); SDPA
    keeps q, k, v and its output. Eager attention
    (gpt-oss: its sinks have no SDPA kernel) also keeps the fp32 softmax and its 16-bit copy: an s^2 term.
    """
    h, q = dims.hidden_size, dims.num_attention_heads * (dims.v_head_dim or dims.head_dim)
    kv = dims.num_key_value_heads * dims.head_dim
    moe_layers = dims.num_layers - dims.dense_layers if dims.num_experts else 0
    dense_mlp = 3 * (dims.intermediate_size or 0) * elem
    expert_mlp = 3 * (dims.moe_intermediate_size or 0) * elem * (dims.experts_per_token + dims.num_shared_experts)
    router = 4 * dims.num_experts
    mlp = (dense_mlp * (dims.num_layers - moe_layers) + (expert_mlp + router) * moe_layers) / dims.num_layers
    attention = (2 * q + 2 * kv) * elem + (4 * (q + kv) if dims.qk_norm else 0)
    if dims.eager_attention:
        attention += dims.num_attention_heads * seq_len * (4 + elem)
    return mlp + dims.norms_per_layer * h * 4 + attention


def layer_activation_bytes(
    dims: Dims,
    method: str | Method | None,
    target_modules: list[str],
    rank: int,
    dropout: float,
    elem: int,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> LayerBytes:
    """One layer's activations kept for backward: the frozen block's, plus what `method`'s adapters add (None:
    the frozen block alone)."""
    base = base_layer_bytes(dims, elem, seq_len)
    if method is None:
        return LayerBytes(base)
    m = method if isinstance(method, Method) else get_method(method)
    extra = m.activation_bytes(target_io(dims, target_modules), rank, dropout, elem)
    return LayerBytes(base + extra.per_token, extra.fixed)


def activation_bytes(
    dims: Dims, layer: LayerBytes, batch_size: int, seq_len: int, elem: int, gradient_checkpointing: bool
) -> float:
    """Activations kept for backward, per process, plus the logits at the loss.

    Without checkpointing every layer keeps its `layer` bytes; with it each layer keeps only its input and one
    layer at a time is recomputed with its full set.
    """
    tokens = batch_size * seq_len
    whole = tokens * layer.per_token + layer.fixed
    kept = (
        dims.num_layers * tokens * dims.hidden_size * elem + whole
        if gradient_checkpointing
        else dims.num_layers * whole
    )
    return kept + tokens * dims.vocab_size * LOGIT_BYTES[elem]


def estimate_memory(
    dims: Dims,
    params_b: float,
    method: str | Method,
    *,
    target_modules: list[str],
    rank: int = 32,
    dropout: float = 0.0,
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
    m = method if isinstance(method, Method) else get_method(method)
    elem = 2 if device == "cuda" else 4  # bf16 on GPU; fp32 on CPU where bf16 matmuls are slow
    total_params = params_b * 1e9
    embed = embedding_param_count(dims)
    weights = m.weights_bytes(dims, total_params, elem, m.quantized_base or quantized)
    experts = m.trains_experts and train_experts
    trainable_params = m.trainable_params(dims, target_modules, rank, density, experts)
    trainable = trainable_params * m.bytes_per_trainable + m.extra_bytes(
        dims, target_modules, trainable_params, rigl_fraction
    )
    layer = layer_activation_bytes(dims, m, target_modules, rank, dropout, elem, seq_len)
    activations = activation_bytes(dims, layer, batch_size, seq_len, elem, gradient_checkpointing)
    if expert_targets(dims, experts):
        # PEFT adds each expert's LoRA delta to a copy of the layer's fused expert weights (ParamWrapper), which
        # the expert matmuls keep for backward: one layer's copy (and the recomputed one) under checkpointing,
        # every layer's without it
        copy = expert_param_count(dims) * elem
        activations += 2 * copy / max(1, dims.num_layers - dims.dense_layers) if gradient_checkpointing else copy
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


def gpu_class_gb(total_gb: float) -> int:
    """Round a memory need up to a standard GPU size (GB), or to a multiple of 80 GB beyond one GPU."""
    for size in GPU_CLASSES_GB:
        if total_gb <= size * GPU_USABLE_FRACTION:
            return size
    return 80 * math.ceil(total_gb / (80 * GPU_USABLE_FRACTION))
