"""Load the base model and attach the method's trainable parameters (LoRA, QLoRA, DoRA)."""

from __future__ import annotations

from contextlib import contextmanager

from pathlib import Path

import torch

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.train.encode import tokenizer_for

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


def load_tokenizer(cfg: JobConfig):
    return tokenizer_for(cfg.model.path, cfg.model.trust_remote_code)


@contextmanager
def _falcon_linear_as_linear():
    """Falcon's layers are FalconLinear, an nn.Linear subclass with the same math, which transformers' bitsandbytes
    integration skips (it converts `type(module) is nn.Linear` only): a QLoRA Falcon would silently keep a
    full-precision base. While a 4-bit model loads, Falcon builds plain nn.Linear layers instead."""
    import transformers.models.falcon.modeling_falcon as falcon

    original = falcon.FalconLinear
    falcon.FalconLinear = torch.nn.Linear
    try:
        yield
    finally:
        falcon.FalconLinear = original


def load_4bit(path: str, *, dtype: torch.dtype, device_map: dict, trust_remote_code: bool = False,
              quant_type: str = "nf4", double_quant: bool = True):
    """A base model with its linear layers in 4-bit (bitsandbytes): QLoRA training, sampling and merges load it here."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                               bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    with _falcon_linear_as_linear():
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map=device_map, dtype=dtype,
                                                    trust_remote_code=trust_remote_code, use_safetensors=True)


def load_model(cfg: JobConfig, device: str, device_index: int | None = None):
    """The base model with LoRA / QLoRA / DoRA adapters or sparse deltas attached; only those train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    method = cfg.method
    dtype = compute_dtype(device)
    if cfg.quantized:
        q = cfg.quantization
        model = load_4bit(cfg.model.path, dtype=dtype, device_map={"": "cpu" if device == "cpu" else device_index or 0},
                          trust_remote_code=cfg.model.trust_remote_code, quant_type=q.bnb_4bit_quant_type,
                          double_quant=q.bnb_4bit_use_double_quant)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=cfg.model.trust_remote_code)
    if method == "sparse":
        from llm_mcp.train.sparse import attach_sparse_deltas

        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        attach_sparse_deltas(model, cfg.lora.target_modules, cfg.sparse.density, cfg.lora.rank, cfg.seed)
        if cfg.init_adapter:  # start from another job's sparse delta (its mask and values)
            from llm_mcp.train.sparse import load_sparse_into

            load_sparse_into(model, Path(cfg.init_adapter))
        model.config.use_cache = False
        return model
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.init_adapter:  # start from another job's adapter (e.g. SFT before DPO), trained further
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(cfg.init_adapter)
        config.lora_dropout = cfg.lora.dropout
        model = PeftModel.from_pretrained(model, cfg.init_adapter, config=config, is_trainable=True)
        model.config.use_cache = False
        return model
    lora = cfg.lora
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, target_parameters=lora.target_parameters or None,
        use_dora=lora.use_dora, bias=lora.bias, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    model.config.use_cache = False
    return model
