"""The support matrix, proven cell by cell.

For every hf_architecture models.yaml names, a tiny random-init checkpoint is built offline (its transformers config
class, safetensors, a local tokenizer with the family's real chat template: llm_mcp/chat_templates). Every
(architecture, method) cell the architecture's profile marks supported or experimental is trained through the MCP
tools and checked end to end; a cell marked unsupported must be refused with its reason. A matrix row whose status
has no cell behind it fails test_every_architecture_in_the_matrix_has_a_tiny_builder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from mcp import Client
from safetensors.torch import load_file

from llm_mcp.core.jobdir import read_metrics
from llm_mcp.server import build_server
from llm_mcp.tiny import ARCHITECTURE_FAMILY, TINY_ARCHITECTURES, make_tiny_model
from tests.conftest import LEARNABLE_ROWS, wait_final

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
METHODS = ("lora", "qlora", "dora", "sparse")
TRAIN = dict(dataset="data/train.jsonl", max_steps=60, learning_rate=5e-3, batch_size=4, max_seq_len=128)
QUESTION = [{"role": "user", "content": "What color is the sky?"}]  # a trained conversation (LEARNABLE_ROWS[0])
# Trained longer, these cells must answer with a trained assistant turn and stop: a base model without a chat
# template (Falcon) on its eos, Llama 3 on <|eot_id|>, the last of the three ids its generation config lists.
STOP_CELLS = {("FalconForCausalLM", "lora"): 200, ("LlamaForCausalLM", "lora"): 200}


def test_every_architecture_in_the_matrix_has_a_tiny_builder(matrix):
    named = {m.hf_architecture for m in matrix.models} | {p.hf_architecture for p in matrix.architectures}
    assert named == set(TINY_ARCHITECTURES) == set(ARCHITECTURE_FAMILY)
    for entry in matrix.models:  # a named model claims no method its architecture's tested profile refuses
        profile = matrix.profile(entry.hf_architecture)
        assert profile, entry.id
        for method, support in entry.methods.items():
            if support.status != "unsupported":
                assert profile.methods[method].status != "unsupported", (entry.id, method)


@pytest.fixture(scope="module")
def suite(tmp_path_factory, request):
    """(home, {arch: {method: job_id}}, {arch: {method: dry run}}): every selected cell's job submitted up front,
    two at a time (LLM_MCP_MAX_JOBS=2), so later architectures train while earlier cells are checked."""
    import anyio

    from llm_mcp.core.matrix import load_matrix
    from llm_mcp.core.settings import data_path

    matrix = load_matrix(data_path("models.yaml"))
    home = tmp_path_factory.mktemp("suite") / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "train.jsonl").write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(64)))
    (home / "data" / "image.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": "A cat."},
                ]
            }
        )
        + "\n"
    )
    cells = {
        (item.callspec.params["arch"], item.callspec.params["method"])
        for item in request.session.items
        if item.originalname == "test_cell"
    }  # the selected cells only (pytest -k Gemma: Gemma's)
    architectures = [
        arch for arch in TINY_ARCHITECTURES if arch in {a for a, _ in cells} or arch == "Qwen3MoeForCausalLM"
    ]
    for arch in architectures:
        make_tiny_model(home / "models" / arch, architecture=arch, chat_family=ARCHITECTURE_FAMILY[arch])
    ids: dict[str, dict] = {arch: {} for arch in TINY_ARCHITECTURES}
    dry: dict[str, dict] = {arch: {} for arch in TINY_ARCHITECTURES}

    async def submit():
        async with Client(build_server(app_state(home))) as client:
            for arch in architectures:
                for method in METHODS:
                    if matrix.profile(arch).methods[method].status == "unsupported":
                        continue
                    args = {**TRAIN, "model": f"models/{arch}", "method": method}
                    args["max_steps"] = STOP_CELLS.get((arch, method), args["max_steps"])
                    if method != "sparse":
                        args["lora_dropout"] = 0.0
                    checked = await client.call_tool("start_finetune", {**args, "dry_run": True})
                    dry[arch][method] = checked.structured_content
                    if (arch, method) not in cells:
                        continue
                    started = await client.call_tool("start_finetune", args)
                    assert not started.is_error, started.content[0].text
                    ids[arch][method] = started.structured_content["job_id"]

    with pytest.MonkeyPatch.context() as env:
        env.setenv("LLM_MCP_MAX_JOBS", "2")
        anyio.run(submit)
        yield home, ids, dry

    async def cancel_leftovers():  # jobs of cells that failed early must not train on after the tests
        async with Client(build_server(app_state(home))) as client:
            for job_id in (job_id for cell in ids.values() for job_id in cell.values()):
                await client.call_tool("cancel_job", {"job_id": job_id})

    anyio.run(cancel_leftovers)


def app_state(home):
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.server import AppState

    return AppState.load(
        Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers", max_queued=64)
    )


def adapted_modules(tensors: dict, method: str) -> set[str]:
    """Module paths an adapter file touches: 'model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.experts'."""
    out = set()
    for key in tensors:
        key = key.removeprefix("base_model.model.")
        name = (
            key.rsplit(".", 1)[0]
            if method == "sparse"
            else re.split(r"\.(lora_A|lora_B|lora_magnitude_vector)", key)[0]
        )
        out.add(name.removesuffix(".base_layer"))  # an expert adapter wraps the fused parameters' owner twice
    return out


def promised_modules(model, targets: list[str], experts: bool, vlm: bool) -> set[str]:
    """Module paths of `model` the matrix promises to adapt: its target linear layers (in the language model of a
    VLM), and each MoE layer's fused experts when `experts`."""
    out = set()
    for name, module in model.named_modules():
        if vlm and ".language_model." not in f".{name}.":
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (isinstance(module, torch.nn.Linear) and leaf in targets) or (
            experts and leaf == "experts" and hasattr(module, "gate_up_proj")
        ):
            out.add(name)
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
async def test_cell(arch, method, suite, matrix):
    profile = matrix.profile(arch)
    if profile.methods[method].status == "unsupported":
        pytest.skip(
            "no architecture profile marks a method unsupported today; named models: test_unsupported_cells_..."
        )
    home, ids, dry = suite
    job_id, dry = ids[arch][method], dry[arch]
    state = app_state(home)
    async with Client(build_server(state)) as client:
        job = await wait_final(client, job_id, timeout=900)
    assert job["state"] == "succeeded", job
    job_dir = state.store.job_dir(job_id)
    metrics = read_metrics(job_dir)

    losses = [m["loss"] for m in metrics if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # it learns
    start = next(m for m in metrics if m.get("event") == "start")
    assert start["trainable_params"] == dry[method]["estimates"]["trainable_params"]  # the estimate is exact
    assert (start["four_bit_layers"] > 0) is (method == "qlora"), start  # QLoRA really is 4-bit

    vlm = arch.endswith("ForConditionalGeneration")
    auto = _auto(vlm)
    base = auto.from_pretrained(home / "models" / arch)
    experts = method in ("lora", "qlora")  # the profiles promise every MoE layer's experts to LoRA and QLoRA
    adapter_file = (
        job_dir / "adapter" / ("sparse_adapter.safetensors" if method == "sparse" else "adapter_model.safetensors")
    )
    adapted = adapted_modules(load_file(str(adapter_file)), method)
    promised = promised_modules(base, profile.target_modules, experts, vlm)
    assert adapted == promised, (sorted(adapted - promised)[:5], sorted(promised - adapted)[:5])
    moe = any(leaf == "experts" for leaf in (n.rsplit(".", 1)[-1] for n, _ in base.named_modules()))
    assert any(n.endswith(".experts") for n in adapted) is (moe and experts)

    async with Client(build_server(state)) as client:
        by_prompt = await client.call_tool("sample", {"job_id": job_id, "prompt": "The cat", "max_tokens": 4})
        by_messages = await client.call_tool("sample", {"job_id": job_id, "messages": QUESTION, "max_tokens": 12})
        peft = await client.call_tool("export_adapter", {"job_id": job_id})
        from_export = await client.call_tool(
            "sample", {"adapter": peft.structured_content["destination"], "messages": QUESTION, "max_tokens": 12}
        )
        merged = await client.call_tool("export_adapter", {"job_id": job_id, "format": "merged"})
        for _ in range(20):  # a merge longer than the call's wait goes on in the background: the same call again
            if merged.is_error or merged.structured_content["state"] != "running":
                break
            merged = await client.call_tool("export_adapter", {"job_id": job_id, "format": "merged"})
        image = await client.call_tool(
            "start_finetune",
            {**TRAIN, "model": f"models/{arch}", "method": method, "dataset": "data/image.jsonl", "dry_run": True},
        )
    assert image.is_error and "training on images is not supported yet" in image.content[0].text
    for result in (by_prompt, by_messages, peft, from_export, merged):
        assert not result.is_error, result.content[0].text
    answer = by_messages.structured_content["completions"][0]
    if (arch, method) in STOP_CELLS:
        assert answer["finish_reason"] == "stop" and answer["text"] in ("The sky is blue.", "Red."), (
            answer
        )  # trained answers
    assert from_export.structured_content["completions"][0]["text"] == answer["text"]  # the export is the adapter

    probe = load_file(str(job_dir / "probe.safetensors"))
    ids_, expected = probe["input_ids"][None], probe["logits"]
    if method != "sparse":  # a PEFT adapter: PEFT reloads it onto the base and gives the trained model's logits
        from peft import PeftModel

        reference = _quantized(home / "models" / arch) if method == "qlora" else base
        reloaded = PeftModel.from_pretrained(reference, peft.structured_content["destination"]).eval()
        with torch.no_grad():
            got = reloaded(input_ids=ids_).logits[0]
        torch.testing.assert_close(
            got, expected, rtol=0, atol=1e-5 if method != "qlora" else 2e-2 * expected.abs().max()
        )
        if method == "qlora":  # the merge is exact against the adapter over the de-quantized 4-bit base
            reloaded = PeftModel.from_pretrained(
                _quantized(home / "models" / arch).dequantize(), peft.structured_content["destination"]
            ).eval()
            with torch.no_grad():
                expected = reloaded(input_ids=ids_).logits[0]
    assert merged.structured_content["state"] == "done", merged.content[0].text
    if method == "lora" or (method == "dora" and arch == "LlamaForCausalLM"):  # a merged model converts alike
        await check_gguf(state, arch, job_id, vlm, merge=True)
    if method == "lora" and not vlm and not moe:
        await check_gguf(state, arch, job_id, vlm, merge=False)
    whole = auto.from_pretrained(merged.structured_content["destination"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids=ids_).logits[0], expected, rtol=0, atol=1e-4)
    if vlm:  # the merged export is a whole VLM whose vision tower is the base's, untouched
        merged_params = dict(whole.named_parameters())
        vision = {
            n: p
            for n, p in base.named_parameters()
            if ".language_model." not in n and "lm_head" not in n and "embed_tokens" not in n
        }
        assert vision and all(torch.equal(merged_params[n], p) for n, p in vision.items())


async def check_gguf(state, arch: str, job_id: str, vlm: bool, merge: bool) -> None:
    """The job's GGUF (f16; merge=False: the base and the adapter as a GGUF LoRA) gives the trained model's greedy
    tokens in llama.cpp; a vision-language model is refused with the reason."""
    from llm_mcp.inference.exports.llama_cpp import converter_dir
    from tests.test_gguf import export, probe_top1

    if converter_dir() is None and not os.environ.get("CI"):
        return  # llama-cpp-python is not set up here (tests/test_gguf.py is skipped too)
    result = await export(state, job_id=job_id, format="gguf", quantization="f16", merge=merge)
    if vlm:
        assert result.is_error and "mmproj" in result.content[0].text, result.content[0].text
        return
    assert not result.is_error, result.content[0].text
    checked = result.structured_content["checked"]
    assert checked["tokenizer_match"] and checked["greedy_tokens_matched"] == "16/16", (arch, checked)
    dest = Path(result.structured_content["destination"])
    model, lora = (dest / "model-f16.gguf", None) if merge else (dest / "base-f16.gguf", dest / "adapter-f16.gguf")
    got, trained = probe_top1(state, job_id, model, lora)
    assert sum(a == b for a, b in zip(got, trained, strict=True)) >= len(trained) - 1, (arch, got, trained)


def _auto(vlm: bool):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if vlm else AutoModelForCausalLM


def _quantized(path):
    from llm_mcp.modeling.base import load_base

    return load_base(str(path), dtype=torch.float32, quant_type="nf4")


async def test_unsupported_cells_are_refused_with_their_reason(app, matrix):
    """A named model's unsupported method (671B DeepSeek, sparse on Qwen3-VL ...) is refused before any download."""
    _, server = app
    cells = [(m, method, s.note) for m in matrix.models for method, s in m.methods.items() if s.status == "unsupported"]
    assert cells
    async with Client(server) as client:
        for model, method, note in cells:
            result = await client.call_tool(
                "start_finetune", {"model": model.id, "method": method, "dataset": "data/train.jsonl", "dry_run": True}
            )
            assert result.is_error and note[:60] in result.content[0].text, (model.id, method, result.content[0].text)


async def test_expert_adapters_refuse_dropout_and_stay_16bit_under_qlora(suite):
    """PEFT cannot apply dropout to fused expert parameters; QLoRA quantizes the attention, not the experts."""
    import bitsandbytes as bnb

    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.train.model import load_model

    home, _, dry = suite
    dry = dry["Qwen3MoeForCausalLM"]
    async with Client(build_server(app_state(home))) as client:
        dropout = await client.call_tool(
            "start_finetune", {**TRAIN, "model": "models/Qwen3MoeForCausalLM", "method": "lora", "lora_dropout": 0.1}
        )
    assert (
        dropout.is_error
        and "lora_dropout=0.1" in dropout.content[0].text
        and "train_experts=false" in dropout.content[0].text
    )
    assert any("experts per layer stay frozen" in w for w in dry["dora"]["warnings"] + dry["sparse"]["warnings"])
    loaded = load_model(JobConfig.parse({**dry["qlora"]["config"], "job_id": "x"}, "test"), "cpu")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules()) == 2 * 4  # q/k/v/o in both layers
    experts = [p for n, p in loaded.named_parameters() if ".experts." in n and n.endswith("gate_up_proj")]
    assert experts and all(p.dtype == torch.float32 and not p.requires_grad for p in experts)
