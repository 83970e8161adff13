"""Activation memory, counted: the bytes autograd keeps for backward, at a real model's layer widths.

`python -m llm_mcp.bench.activations` prints these counts beside the estimate.

Builds the model's decoder at depth 1 and 2 with random weights (its real widths, a small vocabulary), attaches
each method as a job does (PEFT LoRA / DoRA, the sparse deltas), runs a forward under
`torch.autograd.graph.saved_tensors_hooks` and counts every saved storage once, parameters and buffers excluded
(a matmul saves a view of a frozen weight, which is not an activation). The depth-2 minus depth-1 difference is
one layer; tensors with a tokens-long dimension are per token, the rest a fixed part (DoRA's weight copies). These
counts are what `llm_mcp.core.estimates.layer_activation_bytes` is checked against (tests/test_estimates.py),
and the logits term is counted the same way on the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.matrix import Dims
from llm_mcp.core.methods import get_method
from llm_mcp.modeling.adapters import adapter_of_method

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, tuple[str, Dims]] = {  # the decoder's widths as the model's config.json gives them
    "llama-3.1-8b": (
        "llama",
        Dims(hidden_size=4096, num_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=128256, intermediate_size=14336),
    ),
    "qwen3-8b": (
        "qwen3",
        Dims(hidden_size=4096, num_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=151936, intermediate_size=12288, qk_norm=True),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Count:
    per_token: float  # bytes per token per layer
    fixed: float  # bytes per layer whatever the tokens


def build(
    model_type: str, dims: Dims, layers: int, method: str | None, dropout: float, checkpointing: bool, dtype: Any
):
    """A decoder of `layers` layers at `dims`' widths with `method` attached as a job attaches it (None: frozen)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        head_dim=dims.head_dim,
        num_hidden_layers=layers,
        vocab_size=256,  # the logits are counted apart from the layers
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    if method is None:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model = adapter_of_method(method).attach(model, job_config(method, dropout, checkpointing), dtype)
    model.train()
    return model


def job_config(method: str, dropout: float, checkpointing: bool) -> JobConfig:
    """The job config a measurement attaches `method` with: rank 32 on every linear layer, the method's defaults."""
    from types import SimpleNamespace

    from llm_mcp.core.methods.defaults import load_method_defaults

    m = get_method(method)
    request = SimpleNamespace(**dict.fromkeys(m.options))  # the method's own options left to its defaults
    lora = {"rank": 32, "alpha": 32, "dropout": dropout, "target_modules": ALL_LINEAR, "use_dora": m.use_dora}
    return JobConfig.parse(
        {"model": {"id": "m", "path": "m"}, "method": method, "dataset": "d", "learning_rate": 1e-4, "lora": lora,
         "gradient_checkpointing": checkpointing, **m.job_settings(request, load_method_defaults())}
    )  # fmt: skip


def saved_bytes(model, tokens: int) -> tuple[int, int]:
    """Bytes of the distinct storages a forward saves for backward (parameters and buffers excluded): (those with
    a tokens-long dimension, the rest)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    per_token = other = 0

    def pack(t):
        nonlocal per_token, other
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            if tokens in t.shape:
                per_token += storage.nbytes()
            else:
                other += storage.nbytes()
        return t

    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return per_token, other


TOKENS = 96  # a length no layer width or rank equals, so a saved tensor with a 96-long dimension is per token


def count_layer(shape: str, method: str | None, dropout: float, checkpointing: bool, dtype: str = "bf16") -> Count:
    """One layer's saved bytes: per token (tensors with a tokens-long dimension) and fixed (the rest: DoRA's
    weight copies). PEFT's DoRA makes identity matrices it sometimes keeps from an earlier forward, so each depth
    is counted twice and the smaller count kept."""
    import torch

    model_type, dims = SHAPES[shape]
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    counts = {}
    for depth in (1, 2):
        model = build(model_type, dims, depth, method, dropout, checkpointing, torch_dtype)
        runs = [saved_bytes(model, TOKENS) for _ in range(2)]
        counts[depth] = (min(r[0] for r in runs), min(r[1] for r in runs))
        del model
    return Count(per_token=(counts[2][0] - counts[1][0]) / TOKENS, fixed=max(0.0, float(counts[2][1] - counts[1][1])))
