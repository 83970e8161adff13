"""The PEFT layout: LoRA, QLoRA and DoRA adapters (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.layouts import LAYOUTS, adapter_key
from llm_mcp.modeling.adapters.base import Adapter


def enable_checkpointing(model: Any) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


class PeftAdapter(Adapter):
    layout = LAYOUTS["peft"]

    def attach(self, model: Any, cfg: JobConfig, dtype: Any) -> Any:
        from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        from llm_mcp.modeling.base import keep_experts_in, language_model_targets

        if cfg.quantized:  # QLoRA: norms and embeddings in fp32, inputs require grad, checkpointing as planned
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
            keep_experts_in(model, dtype)
        elif cfg.gradient_checkpointing:
            enable_checkpointing(model)
        if cfg.init_adapter:  # start from another job's adapter (e.g. SFT before DPO), trained further
            config = PeftConfig.from_pretrained(cfg.init_adapter)
            config.lora_dropout = cfg.lora.dropout
            model = PeftModel.from_pretrained(model, cfg.init_adapter, config=config, is_trainable=True)
        else:
            lora = cfg.lora
            peft_config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=language_model_targets(model, lora.target_modules),
                target_parameters=lora.target_parameters or None,
                use_dora=lora.use_dora,
                bias=lora.bias,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, peft_config)
        model.config.use_cache = False
        return model

    def save(self, model: Any, out_dir: Path, meta: dict[str, Any], state_dict: dict | None = None) -> None:
        model.save_pretrained(out_dir, state_dict=state_dict)

    def load_weights(self, model: Any, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(path / self.layout.weights_file))

    def merge(self, model: Any, path: Path) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()

    def select(self, sampler: Any, base: dict[str, Any], path: Path | None) -> bool:
        """Adapters are loaded onto the base once and switched by name; the least recently used is dropped past
        the sampler's max_adapters."""
        from peft import PeftModel

        model = base["model"]
        if path is None:
            return False
        key = adapter_key(path)
        adapters: OrderedDict[str, str] = base.setdefault("adapters", OrderedDict())
        if key in adapters:
            adapters.move_to_end(key)
            model.set_adapter(adapters[key])
            return False
        name = f"a{sampler.adapter_loads}"
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            model = base["model"] = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
        model.set_adapter(name)
        model.eval()
        adapters[key] = name
        sampler.adapter_loads += 1
        while len(adapters) > sampler.max_adapters:
            _, old = adapters.popitem(last=False)
            model.delete_adapter(old)
        return True


PEFT = PeftAdapter()
