"""sample and export_adapter on jobs trained once for this module (lora, qlora, dora)."""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import anyio
import pytest
import torch
from mcp import Client
from safetensors.torch import load_file

from llm_mcp.core.settings import Settings, data_path
from llm_mcp.server import AppState, build_server
from tests.conftest import trained_home

pytestmark = pytest.mark.anyio
TRAIN = dict(
    model="models/tiny",
    dataset="data/train.jsonl",
    max_steps=25,
    learning_rate=5e-3,
    lora_dropout=0.0,
    max_seq_len=64,
    checkpoint_every=10,
)
QUESTION = [{"role": "user", "content": "What color is the sky?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_template):
    return trained_home(tmp_path_factory.mktemp("sample"), tiny_model_template, TRAIN, ("lora", "qlora", "dora"))


@pytest.fixture
def state(trained):
    return AppState.load(Settings(home=trained[0], models_path=data_path("models.yaml"), sampler="transformers"))


def probe(state, job_id):
    data = load_file(str(state.store.job_dir(job_id) / "probe.safetensors"))
    return data["input_ids"], data["logits"]


async def call(server, tool, **args):
    async with Client(server) as client:
        return await client.call_tool(tool, args)


async def test_exported_peft_adapter_gives_the_trained_models_logits(trained, state):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home, ids = trained
    server = build_server(state)
    for method in ("lora", "dora"):
        result = await call(server, "export_adapter", job_id=ids[method])
        assert not result.is_error, result.content[0].text
        dest = result.structured_content["destination"]
        files = {os.path.basename(f["path"]) for f in result.structured_content["files"]}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= files
        assert json.loads(Path(f"{dest}/adapter_config.json").read_text())["base_model_name_or_path"] == str(
            home / "models" / "tiny"
        )
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(home / "models" / "tiny"), dest).eval()
        input_ids, expected = probe(state, ids[method])
        with torch.no_grad():
            logits = model(input_ids=input_ids[None]).logits[0]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        card = Path(f"{dest}/README.md").read_text()
        assert "train loss" in card and "PeftModel.from_pretrained" in card


BF16_UNIT_ROUNDOFF = 2.0**-8


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
async def test_merged_export_matches_the_adapter(trained, state, method):
    from transformers import AutoModelForCausalLM

    home, ids = trained
    result = await call(build_server(state), "export_adapter", job_id=ids[method], format="merged")
    assert not result.is_error and result.structured_content["state"] == "done", result.content[0].text
    dest = result.structured_content["destination"]
    assert not any(name.startswith("adapter") for name in os.listdir(dest))
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    input_ids, expected = probe(state, ids[method])
    with torch.no_grad():
        logits = model(input_ids=input_ids[None]).logits[0]
    if method != "qlora":
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        return
    assert any("de-quantized" in n and "bf16" in n for n in result.structured_content["notes"])
    # The merge itself is exact: the same adapter over the de-quantized NF4 base, in fp32, gives the same logits.
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        home / "models" / "tiny", quantization_config=quant, device_map={"": "cpu"}, dtype=torch.float32
    ).dequantize()
    adapter = PeftModel.from_pretrained(base, str(state.store.job_dir(ids[method]) / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, adapter(input_ids=input_ids[None]).logits[0], rtol=0, atol=1e-4)
    # Against the trained 4-bit model: bitsandbytes' fused CPU kernel rounds activations and block scales to bf16
    # on AVX512-BF16 CPUs (unit roundoff u = 2^-8; two roundings per product, two layers): allow 4u of the scale.
    bound = 4 * BF16_UNIT_ROUNDOFF * expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= bound


async def test_archive_export_is_loadable_and_exporting_twice_is_safe(trained, state, tmp_path):
    _, ids = trained
    server = build_server(state)
    first = await call(server, "export_adapter", job_id=ids["lora"], format="archive")
    again = await call(server, "export_adapter", job_id=ids["lora"], format="archive")
    assert again.structured_content["reused"] and again.structured_content["files"] == first.structured_content["files"]
    with tarfile.open(first.structured_content["destination"]) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert (tmp_path / "x" / "adapter_model.safetensors").exists()
    other = await call(
        server,
        "export_adapter",
        job_id=ids["dora"],
        format="archive",
        destination=os.path.basename(first.structured_content["destination"]),
    )
    assert other.is_error and "already holds an export of job" in other.content[0].text
    assert "sha256" in first.content[0].text and "vllm serve" in first.structured_content["snippets"]["vllm"]
    dora = await call(server, "export_adapter", job_id=ids["dora"])
    assert "cannot serve dora" in dora.structured_content["snippets"]["vllm"]


async def test_export_destinations_cannot_escape(trained, state, tmp_path):
    _, ids = trained
    server = build_server(state)
    outside = tmp_path / "outside"
    outside.mkdir()
    for destination in ("../../escape", str(outside / "x"), "/etc/llm"):
        result = await call(server, "export_adapter", job_id=ids["lora"], destination=destination)
        assert result.is_error and "outside the allowed roots" in result.content[0].text, destination
    link = state.settings.home / "exports" / "link"
    link.parent.mkdir(exist_ok=True)
    os.symlink(outside, link, target_is_directory=True)
    result = await call(server, "export_adapter", job_id=ids["lora"], destination="link")
    assert result.is_error and "symlink" in result.content[0].text
    result = await call(server, "export_adapter", job_id=ids["lora"], destination="link/inner")
    assert result.is_error and "outside the allowed roots" in result.content[0].text


async def test_greedy_is_deterministic_seed_repeats_and_compare_base(trained, state):
    _, ids = trained
    server = build_server(state)
    async with Client(server) as client:
        a = await client.call_tool(
            "sample", {"job_id": ids["lora"], "messages": QUESTION, "max_tokens": 12, "compare_base": True}
        )
        b = await client.call_tool("sample", {"job_id": ids["lora"], "messages": QUESTION, "max_tokens": 12})
        s1 = await client.call_tool(
            "sample",
            {"job_id": ids["lora"], "prompt": "The cat", "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 7},
        )
        s2 = await client.call_tool(
            "sample",
            {
                "job_id": ids["lora"],
                "prompt": "The cat",
                "max_tokens": 10,
                "temperature": 1.0,
                "n": 3,
                "seed": 7,
                "logprobs": True,
            },
        )
    assert not a.is_error, a.content[0].text
    da, db = a.structured_content, b.structured_content
    assert da["completions"][0]["text"] == db["completions"][0]["text"]
    answers = ["The sky is blue.", "Red.", "The answer is 5.", "The cat sees a red ball."]
    text = da["completions"][0]["text"].strip()
    assert any(a.startswith(text[:4]) for a in answers), text  # it answers with the dataset's answers
    assert da["base_completions"] and da["base_completions"][0]["text"] != da["completions"][0]["text"]
    assert da["backend"] == "transformers" and da["source"]["checkpoint"] == "final"
    texts = [c["text"] for c in s1.structured_content["completions"]]
    assert texts == [c["text"] for c in s2.structured_content["completions"]] and len(texts) == 3
    logprobs = s2.structured_content["completions"][0]["logprobs"]
    assert logprobs and all(lp["logprob"] <= 0 for lp in logprobs)


async def test_a_second_adapter_on_the_same_base_does_not_reload_it(trained, state):
    _, ids = trained
    server = build_server(state)
    async with Client(server) as client:
        first = await client.call_tool("sample", {"job_id": ids["lora"], "prompt": "Hi", "max_tokens": 2})
        second = await client.call_tool("sample", {"job_id": ids["dora"], "prompt": "Hi", "max_tokens": 2})
        back = await client.call_tool("sample", {"job_id": ids["lora"], "prompt": "Hi", "max_tokens": 2})
    assert first.structured_content["base_loaded"] is True
    assert second.structured_content["base_loaded"] is False and second.structured_content["adapter_loaded"] is True
    assert back.structured_content["adapter_loaded"] is False  # still cached: a set_adapter, not a load
    assert state.sampler.base_loads == 1 and state.sampler.adapter_loads == 2


async def test_sample_argument_errors(trained, state):
    _, ids = trained
    server = build_server(state)
    cases = [
        ({"prompt": "x"}, "exactly one of job_id, adapter or model"),
        ({"job_id": ids["lora"]}, "exactly one of prompt or messages"),
        ({"job_id": ids["lora"], "prompt": "x", "max_tokens": 10**6}, "max_tokens=1000000 is out of range"),
        ({"job_id": ids["lora"], "prompt": "x", "n": 4}, "n > 1 needs temperature > 0"),
        (
            {"job_id": ids["lora"], "prompt": "x", "checkpoint": "99"},
            "allowed: 'final', 'latest' or a step in [10, 20]",
        ),
        ({"job_id": ids["lora"], "messages": [{"role": "wizard", "content": "x"}]}, "role in"),
        ({"model": "Qwen/Qwen3-7B", "prompt": "x"}, "Did you mean"),
    ]
    for args, fragment in cases:
        result = await call(server, "sample", **args)
        assert result.is_error and fragment in result.content[0].text, (args, result.content[0].text)


async def test_sample_by_adapter_path_and_base_model(trained, state):
    _, ids = trained
    server = build_server(state)
    exported = await call(server, "export_adapter", job_id=ids["dora"])
    by_path = await call(
        server, "sample", adapter=exported.structured_content["destination"], messages=QUESTION, max_tokens=8
    )
    by_job = await call(server, "sample", job_id=ids["dora"], messages=QUESTION, max_tokens=8)
    base = await call(server, "sample", model="models/tiny", messages=QUESTION, max_tokens=8)
    assert by_path.structured_content["completions"] == by_job.structured_content["completions"]
    assert base.structured_content["source"].get("adapter_path") is None


@pytest.mark.slow
async def test_sampling_a_running_jobs_latest_checkpoint(trained, state):
    server = build_server(state)
    async with Client(server) as client:
        started = await client.call_tool(
            "start_finetune", {**TRAIN, "method": "lora", "max_steps": 3000, "checkpoint_every": 5}
        )
        job_id = started.structured_content["job_id"]
        deadline = time.monotonic() + 90
        while not list((state.store.job_dir(job_id) / "checkpoints").glob("step-*[0-9]")):
            assert time.monotonic() < deadline
            await anyio.sleep(0.2)
        final = await client.call_tool("sample", {"job_id": job_id, "prompt": "Hi", "max_tokens": 3})
        latest = await client.call_tool(
            "sample", {"job_id": job_id, "prompt": "Hi", "max_tokens": 3, "checkpoint": "latest"}
        )
        await client.call_tool("cancel_job", {"job_id": job_id})
    assert final.is_error and "checkpoint='latest'" in final.content[0].text
    assert not latest.is_error, latest.content[0].text
    assert latest.structured_content["source"]["checkpoint"].startswith("step ")
