"""The model a job trains: its base (llm_mcp.modeling.base) with the method's adapter layout attached."""

from __future__ import annotations

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.modeling.adapters import adapter_of_method
from llm_mcp.modeling.base import compute_dtype, load_base
from llm_mcp.modeling.encode import tokenizer_for


def load_tokenizer(cfg: JobConfig):
    return tokenizer_for(cfg.model.path, cfg.model.trust_remote_code)


def load_model(cfg: JobConfig, device: str, device_index: int | None = None):
    """The base model with the job's LoRA / QLoRA / DoRA adapter or sparse deltas attached; only those train."""
    dtype = compute_dtype(device)
    q = cfg.quantization
    model = load_base(
        cfg.model.path,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        device_map={"": "cpu" if device == "cpu" else device_index or 0},
        quant_type=q.bnb_4bit_quant_type if q else None,
        double_quant=q.bnb_4bit_use_double_quant if q else True,
    )
    return adapter_of_method(cfg.method).attach(model, cfg, dtype)
