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


def native_bf16() -> bool:
    """Whether this GPU computes bf16 in hardware (Ampere and later). T4 and V100 only emulate it, slowly, and
    torch.cuda.is_bf16_supported() counts emulation unless told not to."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def compute_dtype(device: str, bf16: bool | None = None) -> torch.dtype:
    """bf16 on GPUs that compute it natively, else fp16 on GPU; fp32 on CPU (bf16 matmuls are slow there)."""
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if (native_bf16() if bf16 is None else bf16) else torch.float16


def mixed_precision(device: str, bf16: bool | None = None) -> str:
    """accelerate's mixed_precision for the trainer: 'fp16' (autocast + GradScaler loss scaling) where the
    compute dtype is fp16 (GPUs without native bf16), else 'no' (bf16 and fp32 need no loss scaling)."""
    if device == "cpu":
        return "no"
    return "no" if (native_bf16() if bf16 is None else bf16) else "fp16"


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
        return auto.from_pretrained(path, **kwargs, **dequantized(config))
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


def checkpoint_dtype(path: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (its config's dtype: bf16 for most hub models), fp32 when it
    does not say: a QLoRA merge de-quantizes into it, so a merged 8B model is 16 GB, not 32, and a 70B merge does
    not need 280 GB of RAM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    text = getattr(config, "text_config", None)
    saved = getattr(config, "dtype", None) or (getattr(text, "dtype", None) if text is not None else None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in (torch.bfloat16, torch.float16) else torch.float32


def dequantized(config) -> dict:
    """from_pretrained's arguments that load a checkpoint shipped quantized as trainable 16-bit weights: gpt-oss'
    MXFP4 experts are otherwise kept MXFP4 wherever the `kernels` package and triton are installed, and PEFT's
    target_parameters cannot adapt them there."""
    quant = getattr(config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


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
