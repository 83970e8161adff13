"""Loading a base model as training, sampling and merges all load it: dtype, 4-bit, vision-language classes.

Shared by the trainer (llm_mcp.train), the samplers and merges (llm_mcp.inference): imports torch, so
only those processes (and the server's sampler, on first use) import it.
"""

from __future__ import annotations

import re
import sys
import threading
from contextlib import contextmanager

import torch


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU (bf16 matmuls are slow there)."""
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def mixed_precision(device: str, bf16_supported: bool | None = None) -> str:
    """accelerate's mixed_precision for the trainer: 'fp16' (autocast + GradScaler loss scaling) where the
    compute dtype is fp16 (GPUs without bf16), else 'no' (bf16 and fp32 need no loss scaling)."""
    if device == "cpu":
        return "no"
    bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    return "no" if bf16 else "fp16"


_PATCH_LOCK = threading.Lock()  # model loads in the server's sampler threads must not interleave the patch


@contextmanager
def _falcon_linear_as_linear():
    """Falcon's layers are FalconLinear, an nn.Linear subclass with the same math, which transformers' bitsandbytes
    integration skips (it converts `type(module) is nn.Linear` only): a QLoRA Falcon would silently keep a
    full-precision base. While a 4-bit Falcon loads, it builds plain nn.Linear layers instead."""
    import transformers.models.falcon.modeling_falcon as falcon

    with _PATCH_LOCK:
        original = falcon.FalconLinear
        falcon.FalconLinear = torch.nn.Linear
        try:
            yield
        finally:
            falcon.FalconLinear = original


# Modules of an image-text model that stay as they are under QLoRA. transformers anchors these patterns at the
# start of a module's full name (re.match), so a bare "vision_tower" would miss "model.vision_tower.encoder...".
VISION_MODULES = [r".*\bvision_tower", r".*\bvisual", r".*\bmulti_modal_projector", "lm_head"]


def is_vision_language(config) -> bool:
    """True for an image-text checkpoint's config (Gemma3ForConditionalGeneration, Qwen3-VL, ...)."""
    return getattr(config, "vision_config", None) is not None


def load_base(
    path: str,
    *,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    device_map: dict | None = None,
    quant_type: str | None = None,
    double_quant: bool = True,
):
    """The base model as training, sampling and merges load it: a vision-language checkpoint with its image-text
    class (the whole model, vision tower included, so a merge stays a loadable VLM), any other with the causal-LM
    class; `quant_type` (e.g. 'nf4'): linear layers in 4-bit (bitsandbytes, QLoRA; a VLM's vision side stays)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    vlm = is_vision_language(config)
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    kwargs: dict = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quant_type is None:
        return auto.from_pretrained(path, **kwargs)
    kwargs.update(
        device_map=device_map or {"": "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=VISION_MODULES if vlm else None,
        ),
    )
    if getattr(config, "model_type", "") != "falcon":
        return auto.from_pretrained(path, **kwargs)
    with _falcon_linear_as_linear():
        return auto.from_pretrained(path, **kwargs)


def keep_experts_in(model, dtype: torch.dtype) -> None:
    """prepare_model_for_kbit_training upcasts every non-4-bit parameter to fp32, fused MoE experts included:
    put them back in the compute dtype, so QLoRA's experts cost 16 bits on GPU as the estimate counts them."""
    for name, param in model.named_parameters():
        if ".experts." in name and not name.split(".")[-1].startswith("lora") and param.dtype != dtype:
            param.data = param.data.to(dtype)


def language_model_targets(model, names: list[str]) -> list[str] | str:
    """LoRA target_modules: the names as given, or for a vision-language model a pattern that keeps the vision
    tower untouched (its attention has layers of the same names)."""
    from llm_mcp.modeling.sparse import has_language_model

    if not has_language_model(model):
        return names
    return r".*\.language_model\..*\.(" + "|".join(re.escape(n) for n in names) + r")$"


def four_bit_layers(model) -> int:
    """How many linear layers of `model` are bitsandbytes 4-bit (0 without bitsandbytes loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) if bnb else 0
