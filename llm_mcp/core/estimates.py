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

from llm_mcp.core.experts import expert_param_count, expert_targets
from llm_mcp.core.matrix import Dims
from llm_mcp.core.methods import Method, get_method
from llm_mcp.core.shapes import GiB, embedding_param_count

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
    method: str | Method,
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
    activations = activation_bytes(dims, batch_size * seq_len, elem, gradient_checkpointing)
    if expert_targets(dims, experts):
        # PEFT adds each expert's LoRA delta to a copy of the layer's fused expert weights (ParamWrapper), which
        # the expert matmuls keep for backward: one layer's copy (and the recomputed one) under checkpointing,
        # every layer's without it
        copy = expert_param_count(dims) * elem
        activations += 2 * copy / max(1, dims.num_layers - dims.dense_layers) if gradient_checkpointing else copy
    activations *= m.activation_factor
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
