"""Local model directories and the tiny model: built offline, loadable, confined to allowed roots."""

from __future__ import annotations

import json
import os

import pytest

from llm_mcp.core.errors import PathNotAllowedError, UnknownModelError
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.shapes import lora_param_count


def test_tiny_model_loads_with_transformers_and_generates(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert model.config.head_dim >= 32  # the CPU vLLM build rejects head_dim 16
    size = sum(f.stat().st_size for f in tiny_model.iterdir())
    assert size < 8 * 1024 * 1024
    assert not list(tiny_model.glob("*.bin")), "weights must be safetensors"
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(assistant) == "5<|im_end|>"
    out = model.generate(torch.tensor([enc["input_ids"]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(enc["input_ids"])


def test_tiny_model_is_deterministic(tmp_path):
    from llm_mcp.tiny import make_tiny_model

    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_local_model_dims_come_from_config(matrix, settings, tiny_model):
    entry = resolve_model(matrix, settings, str(tiny_model))
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert entry.is_local and entry.hf_architecture == "LlamaForCausalLM"
    assert entry.dims.hidden_size == cfg["hidden_size"] and entry.dims.num_layers == cfg["num_hidden_layers"]
    assert entry.chat_template is True
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert round(entry.params_b * 1e9) == n_params  # read from safetensors headers


def test_relative_paths_resolve_against_the_state_dir(matrix, settings, tiny_model):
    assert resolve_model(matrix, settings, "models/tiny").dims.hidden_size == 128


def test_lora_param_count_equals_peft(matrix, settings, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    entry = resolve_model(matrix, settings, str(tiny_model))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=8, lora_alpha=8, target_modules=entry.target_modules),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_param_count(entry.dims, entry.target_modules, 8)


def test_paths_outside_allowed_roots_are_refused(matrix, settings, tiny_model_template, tmp_path):
    with pytest.raises(PathNotAllowedError) as err:
        resolve_model(matrix, settings, str(tiny_model_template))
    assert "outside the allowed roots" in str(err.value) and "--allow-root" in str(err.value)
    link = settings.home / "escape"
    os.symlink(tiny_model_template, link)
    with pytest.raises(PathNotAllowedError):
        resolve_model(matrix, settings, str(link))
    with pytest.raises(PathNotAllowedError):
        resolve_model(matrix, settings, "../../" + tiny_model_template.name)
    settings.allowed_roots.append(tiny_model_template.parent)
    assert resolve_model(matrix, settings, str(tiny_model_template)).is_local


def test_unknown_architecture_lists_the_known_ones(matrix, settings, tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (tiny_model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownModelError) as err:
        resolve_model(matrix, settings, str(tiny_model))
    assert "'BertForMaskedLM'" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_directory_without_config_and_missing_directory(matrix, settings):
    (settings.home / "empty").mkdir()
    with pytest.raises(UnknownModelError, match=r"config\.json"):
        resolve_model(matrix, settings, "empty")
    with pytest.raises(UnknownModelError, match="neither a matrix model nor an existing directory"):
        resolve_model(matrix, settings, "nothing-here")
