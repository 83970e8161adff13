"""Mixture-of-experts models trained for real: tiny random-init checkpoints of each MoE architecture, driven
through the MCP tools. LoRA / QLoRA adapt attention *and* every expert (router frozen); the exported adapter
holds the expert tensors, reloads in PEFT and merges into a model with the trained model's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from mcp import Client
from safetensors.torch import load_file

from llm_mcp.core.jobdir import read_metrics
from llm_mcp.tiny import make_tiny_model
from tests.conftest import LEARNABLE_ROWS, wait_final

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
MOE = ["Qwen3MoeForCausalLM", "MixtralForCausalLM", "GptOssForCausalLM", "DeepseekV3ForCausalLM"]
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")  # DeepSeek-V3 / Kimi-K2 attention


@pytest.fixture(scope="module")
def moe_templates(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_tiny_model(root / arch, architecture=arch, num_experts=4)
            for arch in MOE}


def place(home, template, arch: str) -> str:
    import shutil

    shutil.copytree(template, home / "models" / arch)
    (home / "data").mkdir(exist_ok=True)
    (home / "data" / "train.jsonl").write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(64)))
    return f"models/{arch}"


@pytest.mark.parametrize("arch", MOE)
async def test_lora_trains_attention_and_experts_and_exports(app, home, moe_templates, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state, server = app
    model = place(home, moe_templates[arch], arch)
    args = dict(model=model, method="lora", dataset="data/train.jsonl", max_steps=40,
                learning_rate=5e-3, batch_size=4, max_seq_len=64)
    async with Client(server) as client:
        dry = await client.call_tool("start_finetune", {**args, "dry_run": True})
        assert not dry.is_error, dry.content[0].text
        lora = dry.structured_content["config"]["lora"]
        assert lora["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        assert lora["dropout"] == 0.0
        started = await client.call_tool("start_finetune", args)
        assert not started.is_error, started.content[0].text
        job_id = started.structured_content["job_id"]
        job = await wait_final(client, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        sample = await client.call_tool("sample", {"job_id": job_id, "messages": [{"role": "user", "content": "Name a color."}],
                                                   "max_tokens": 5})
        assert not sample.is_error, sample.content[0].text
        peft_export = await client.call_tool("export_adapter", {"job_id": job_id})
        merged_export = await client.call_tool("export_adapter", {"job_id": job_id, "format": "merged"})
    job_dir = state.store.job_dir(job_id)
    losses = [m["loss"] for m in read_metrics(job_dir) if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses  # as the dense tiny model in test_jobs
    start = next(m for m in read_metrics(job_dir) if m.get("event") == "start")
    assert start["trainable_params"] == dry.structured_content["estimates"]["trainable_params"]

    tensors = load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))
    deepseek = arch == "DeepseekV3ForCausalLM"  # its layer 0 is dense (first_k_dense_replace=1)
    for layer in range(2):  # every MoE layer's experts and all attention are adapted; the router is not
        assert any(f"layers.{layer}.mlp.experts" in k for k in tensors) is (layer == 1 or not deepseek), sorted(tensors)
        for name in MLA if deepseek else ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert any(f"layers.{layer}.self_attn.{name}." in k for k in tensors), (layer, name)
    assert not any(".mlp.gate." in k or ".router." in k for k in tensors)

    probe = load_file(str(job_dir / "probe.safetensors"))
    ids, expected = probe["input_ids"][None], probe["logits"]
    assert not peft_export.is_error, peft_export.content[0].text
    base = AutoModelForCausalLM.from_pretrained(home / "models" / arch)
    reloaded = PeftModel.from_pretrained(base, peft_export.structured_content["destination"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0], expected, rtol=0, atol=1e-5)
    assert not merged_export.is_error and merged_export.structured_content["state"] == "done", merged_export.content[0].text
    dest = merged_export.structured_content["destination"]
    assert not any(name.startswith("adapter") for name in os.listdir(dest))
    merged = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits[0], expected, rtol=0, atol=1e-4)


async def test_moe_qlora_is_4bit_with_16bit_experts_and_dora_and_sparse_keep_experts_frozen(app, home, moe_templates):
    import bitsandbytes as bnb

    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.train.model import load_model

    state, server = app
    model = place(home, moe_templates["Qwen3MoeForCausalLM"], "Qwen3MoeForCausalLM")
    async with Client(server) as client:
        qlora = await client.call_tool("start_finetune", dict(model=model, method="qlora", dataset="data/train.jsonl",
                                                              max_steps=2, lora_rank=4, dry_run=True))
        dora = await client.call_tool("start_finetune", dict(model=model, method="dora", dataset="data/train.jsonl",
                                                             max_steps=2, lora_rank=4, dry_run=True))
        dropout = await client.call_tool("start_finetune", dict(model=model, method="lora", dataset="data/train.jsonl",
                                                                max_steps=2, lora_dropout=0.1))
        sparse = await client.call_tool("start_finetune", dict(model=model, method="sparse", dataset="data/train.jsonl",
                                                               max_steps=8, learning_rate=5e-3, max_seq_len=64))
    assert dropout.is_error and "lora_dropout=0.1" in dropout.content[0].text and "train_experts=false" in dropout.content[0].text
    assert dora.structured_content["config"]["lora"]["target_parameters"] == []
    assert any("experts per layer stay frozen" in w for w in dora.structured_content["warnings"])
    cfg = JobConfig.parse({**qlora.structured_content["config"], "job_id": "x"}, "test")
    loaded = load_model(cfg, "cpu")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules()) == 2 * 4  # q/k/v/o in both layers
    experts = [p for n, p in loaded.named_parameters() if ".experts." in n and n.endswith("gate_up_proj")]
    assert experts and all(p.dtype == torch.float32 and not p.requires_grad for p in experts)
    assert any("mlp.experts" in n and "lora_A" in n and p.requires_grad for n, p in loaded.named_parameters())
    assert not sparse.is_error, sparse.content[0].text  # sparse deltas train the attention; experts frozen
    assert any("experts per layer stay frozen" in w for w in sparse.structured_content["warnings"])
    async with Client(server) as client:
        job = await wait_final(client, sparse.structured_content["job_id"], timeout=300)
    assert job["state"] == "succeeded", job
    tensors = load_file(str(state.store.job_dir(job["job_id"]) / "adapter" / "sparse_adapter.safetensors"))
    assert tensors and not any("experts" in k for k in tensors) and any("self_attn" in k for k in tensors)


async def test_falcon_qlora_really_is_4bit_and_its_merged_export_matches(app, home, tmp_path_factory):
    """Falcon's FalconLinear layers (an nn.Linear subclass) used to stay full precision under QLoRA."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_mcp.train.model import load_base

    state, server = app
    template = make_tiny_model(tmp_path_factory.mktemp("falcon") / "falcon", architecture="FalconForCausalLM")
    model = place(home, template, "FalconForCausalLM")
    args = dict(model=model, method="qlora", dataset="data/train.jsonl", max_steps=40, learning_rate=5e-3,
                batch_size=4, max_seq_len=64, lora_dropout=0.0)
    async with Client(server) as client:
        started = await client.call_tool("start_finetune", args)
        assert not started.is_error, started.content[0].text
        job_id = started.structured_content["job_id"]
        job = await wait_final(client, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        merged = await client.call_tool("export_adapter", {"job_id": job_id, "format": "merged"})
    job_dir = state.store.job_dir(job_id)
    losses = [m["loss"] for m in read_metrics(job_dir) if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    base = load_base(str(home / "models" / "FalconForCausalLM"), dtype=torch.float32, quant_type="nf4")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) == 2 * 4  # every linear layer of both layers
    assert not merged.is_error and merged.structured_content["state"] == "done", merged.content[0].text
    # The merge is exact: the adapter over the de-quantized 4-bit base gives the merged model's logits.
    reference = PeftModel.from_pretrained(base.dequantize(), str(job_dir / "adapter")).eval()
    ids = load_file(str(job_dir / "probe.safetensors"))["input_ids"][None]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0]
        got = AutoModelForCausalLM.from_pretrained(merged.structured_content["destination"]).eval()(input_ids=ids).logits[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["Gemma3ForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"])
async def test_vision_language_models_train_their_language_model_on_text(app, home, tmp_path_factory, arch):
    """Loaded with the image-text class; adapters only in the language model; the merged export is a whole VLM."""
    from transformers import AutoModelForImageTextToText

    state, server = app
    template = make_tiny_model(tmp_path_factory.mktemp("vlm") / arch, architecture=arch)
    model = place(home, template, arch)
    (home / "data" / "image.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "A cat."}]}) + "\n")
    args = dict(model=model, method="lora", dataset="data/train.jsonl", max_steps=40, learning_rate=5e-3,
                batch_size=4, max_seq_len=64)
    async with Client(server) as client:
        image = await client.call_tool("start_finetune", {**args, "dataset": "data/image.jsonl"})
        started = await client.call_tool("start_finetune", args)
        assert not started.is_error, started.content[0].text
        job_id = started.structured_content["job_id"]
        job = await wait_final(client, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        sample = await client.call_tool("sample", {"job_id": job_id, "prompt": "The cat", "max_tokens": 5})
        merged = await client.call_tool("export_adapter", {"job_id": job_id, "format": "merged"})
    assert image.is_error and "training on images is not supported yet" in image.content[0].text
    assert not sample.is_error, sample.content[0].text
    job_dir = state.store.job_dir(job_id)
    losses = [m["loss"] for m in read_metrics(job_dir) if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    tensors = load_file(str(job_dir / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(".language_model." in k for k in tensors), sorted(tensors)[:5]
    assert not merged.is_error and merged.structured_content["state"] == "done", merged.content[0].text
    whole = AutoModelForImageTextToText.from_pretrained(merged.structured_content["destination"]).eval()
    base = AutoModelForImageTextToText.from_pretrained(home / "models" / arch)
    vision = {n: p for n, p in base.named_parameters() if ".language_model." not in n and "lm_head" not in n
              and "embed_tokens" not in n}
    merged_params = dict(whole.named_parameters())
    assert vision and all(torch.equal(merged_params[n], p) for n, p in vision.items())  # the vision tower is untouched
    probe = load_file(str(job_dir / "probe.safetensors"))
    with torch.no_grad():
        logits = whole(input_ids=probe["input_ids"][None]).logits[0]
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-4)
