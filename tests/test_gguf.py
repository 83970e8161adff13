"""export_adapter(format='gguf'): llama.cpp's converter and quantizer, checked in a real llama.cpp (llama-cpp-python).

Every architecture's GGUF is proven in tests/test_architectures.py (test_cell); here the tool's behaviour on the
tiny Llama: quantizations, the adapter-only route, the Modelfile, refusals, reuse and cancelling.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from mcp import Client
from safetensors.torch import load_file

from llm_mcp.core.settings import Settings, data_path
from llm_mcp.inference.exports.llama_cpp import converter_dir
from llm_mcp.server import AppState, build_server
from tests.conftest import processes_mentioning, trained_home

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        converter_dir() is None and not os.environ.get("CI"),
        reason="llama-cpp-python and its converter are not set up (make install does it; CI requires them)",
    ),
]
TRAIN = dict(model="models/tiny", dataset="data/train.jsonl", max_steps=25, learning_rate=5e-3, max_seq_len=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_template):
    return trained_home(tmp_path_factory.mktemp("gguf"), tiny_model_template, TRAIN, ("lora", "dora"))


@pytest.fixture
def state(trained):
    return AppState.load(Settings(home=trained[0], models_path=data_path("models.yaml"), sampler="transformers"))


async def export(state, **args):
    """export_adapter until it is no longer running (a conversion longer than a call goes on in the background)."""
    async with Client(build_server(state)) as client:
        for _ in range(20):
            result = await client.call_tool("export_adapter", args)
            if result.is_error or result.structured_content["state"] != "running":
                return result
    raise AssertionError("the export kept running")


def probe_top1(state: AppState, job_id: str, model: Path, lora: Path | None = None) -> tuple[list[int], list[int]]:
    """(llama.cpp's top-1 tokens, the trained model's) over the probe the training run saved."""
    import llama_cpp

    probe = load_file(str(state.store.job_dir(job_id) / "probe.safetensors"))
    ids = probe["input_ids"].tolist()
    llm = llama_cpp.Llama(
        model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=128, logits_all=True, verbose=False
    )
    try:
        llm.eval(ids)
        got = llm.scores[: len(ids)].argmax(axis=-1).tolist()
    finally:
        llm.close()
    return got, probe["logits"].argmax(dim=-1).tolist()


async def test_a_q4_k_m_gguf_with_a_modelfile_checked_in_llama_cpp(trained, state):
    _, ids = trained
    result = await export(state, job_id=ids["lora"], format="gguf", quantization="q4_k_m")
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    dest = Path(out["destination"])
    names = {Path(f["path"]).name for f in out["files"]}
    assert {"model-q4_k_m.gguf", "Modelfile", "README.md", "export.json"} <= names, names
    assert not any(n.startswith(".") or n.endswith(".safetensors") for n in os.listdir(dest))  # no leftovers
    checked = out["checked"]
    assert checked["tokenizer_match"] and checked["quantization"] == "q4_k_m" and not checked["adapter_applied"]
    assert checked["top1_agreement"] >= 0.5
    assert (dest / "model-q4_k_m.gguf").read_bytes()[:4] == b"GGUF"
    modelfile = (dest / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q4_k_m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "ollama create" in out["snippets"]["ollama"] and "llama-server -m" in out["snippets"]["llama-server"]
    assert "## Run" in (dest / "README.md").read_text()
    manifest = json.loads((dest / "export.json").read_text())
    assert manifest["check"] == checked and manifest["quantization"] == "q4_k_m" and manifest["merge"] is True
    again = await export(state, job_id=ids["lora"], format="gguf", quantization="q4_k_m")
    assert again.structured_content["reused"] and again.structured_content["checked"] == checked


async def test_f16_gives_the_trained_models_tokens(trained, state):
    _, ids = trained
    for method in ("lora", "dora"):  # DoRA goes through the merged route
        result = await export(state, job_id=ids[method], format="gguf", quantization="f16")
        assert not result.is_error, result.content[0].text
        checked = result.structured_content["checked"]
        assert checked["greedy_tokens_matched"] == "16/16" and checked["max_logit_diff_rel"] < 0.01, checked
        got, trained_top1 = probe_top1(
            state, ids[method], Path(result.structured_content["destination"]) / "model-f16.gguf"
        )
        assert got == trained_top1  # against the training run's own logits, not only the merged model's


async def test_a_lora_adapter_alone_as_a_gguf_lora(trained, state):
    _, ids = trained
    result = await export(state, job_id=ids["lora"], format="gguf", quantization="f16", merge=False)
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    dest = Path(out["destination"])
    assert {"base-f16.gguf", "adapter-f16.gguf", "Modelfile"} <= {Path(f["path"]).name for f in out["files"]}
    assert out["checked"]["adapter_applied"] and out["checked"]["greedy_tokens_matched"] == "16/16"
    modelfile = (dest / "Modelfile").read_text()
    assert "FROM ./base-f16.gguf\nADAPTER ./adapter-f16.gguf\n" in modelfile
    assert "--lora" in out["snippets"]["llama-cli"]
    with_adapter, trained_top1 = probe_top1(state, ids["lora"], dest / "base-f16.gguf", dest / "adapter-f16.gguf")
    alone, _ = probe_top1(state, ids["lora"], dest / "base-f16.gguf")
    assert with_adapter == trained_top1 and alone != trained_top1  # the adapter is what makes it the trained model


async def test_bad_gguf_requests_are_refused_with_the_way_forward(trained, state):
    _, ids = trained
    dora = await export(state, job_id=ids["dora"], format="gguf", merge=False)
    assert dora.is_error and "merge=false" in dora.content[0].text and "omit merge" in dora.content[0].text
    peft = await export(state, job_id=ids["lora"], format="peft", quantization="q4_k_m")
    assert peft.is_error and "format='gguf' only" in peft.content[0].text
    bad = await export(state, job_id=ids["lora"], format="gguf", quantization="q3_k")
    assert bad.is_error and "q4_k_m" in bad.content[0].text
    exports = trained[0] / "exports"
    assert not any("q3_k" in p.name for p in exports.iterdir()) if exports.exists() else True


async def test_a_running_gguf_export_can_be_cancelled_leaving_nothing(trained, state, monkeypatch):
    import llm_mcp.inference.merge as merge

    monkeypatch.setattr(merge, "MERGE_WAIT_S", 0.5)  # answer while the worker is still converting
    _, ids = trained
    args = dict(job_id=ids["lora"], format="gguf", quantization="q8_0", destination="cancelled-gguf")
    async with Client(build_server(state)) as client:
        first = await client.call_tool("export_adapter", args)
        assert first.structured_content["state"] == "running", first.content[0].text
        assert "call export_adapter again" in first.content[0].text
        stopped = await client.call_tool("export_adapter", {**args, "cancel": True})
        assert stopped.structured_content["state"] == "cancelled", stopped.content[0].text
        again = await client.call_tool("export_adapter", {**args, "cancel": True})
    assert again.is_error and "no gguf export" in again.content[0].text
    exports = trained[0] / "exports"
    time.sleep(0.5)
    assert not [p.name for p in exports.iterdir() if "cancelled-gguf" in p.name and not p.name.endswith(".log")]
    assert not processes_mentioning("llm_mcp.inference.exports.worker", "cancelled-gguf")  # the worker was stopped


def test_the_modelfile_template_is_the_chat_template(tmp_path):
    """The Go template, filled in as Ollama does, renders one turn as the model's own chat template does."""
    from transformers import AutoTokenizer

    from llm_mcp.inference.exports.modelfile import ollama_template
    from llm_mcp.tiny import make_tiny_model

    for family in ("llama3", "qwen3", "gemma3", "mistral", "chatml"):
        path = make_tiny_model(tmp_path / family, hidden_size=32, num_layers=1, chat_family=family)
        tok = AutoTokenizer.from_pretrained(path)
        template, stops = ollama_template(tok)
        assert template is not None and stops, family
        for system in ("Be brief.", None):
            messages = [{"role": "user", "content": "Hi there"}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            try:
                expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # a template without system messages (Gemma folds them, Mistral may refuse)
                continue
            expected = expected.removeprefix(tok.bos_token or "\0")
            assert _fill(template, system, "Hi there").removesuffix(stops[0]) == expected, (family, system)


def _fill(template: str, system: str | None, prompt: str) -> str:
    """Ollama's filling of the only constructs the template uses: {{ if .System }}A{{ else }}B{{ end }}, fields."""
    if template.startswith("{{ if .System }}"):
        body, _, tail = template[len("{{ if .System }}") :].partition("{{ end }}")
        with_system, _, plain = body.partition("{{ else }}")
        template = (with_system if system else plain) + tail
    return (
        template.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", "")
    )


def test_a_hub_models_gguf_is_converted_from_its_cached_snapshot(tmp_path, monkeypatch, tiny_model_template):
    """A job on a hub id (no local directory) converts from the snapshot its job downloaded into the cache."""
    from llm_mcp.inference.exports.gguf import local_dir
    from tests.test_gpu_paths import hub_model_cache

    cache = hub_model_cache(tmp_path / "hub", "someorg/tiny", tiny_model_template)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = local_dir("someorg/tiny")
    assert found.is_dir() and "snapshots" in found.parts and (found / "config.json").is_file()
    assert local_dir(str(tiny_model_template)) == tiny_model_template
