"""An agent that knows only what the server tells it: cold start to a sample from its own adapter.

A fresh stdio server (as Claude Desktop starts it), a state directory holding only a local
checkpoint, and no path known in advance: every path the agent passes comes from a result.
"""

from __future__ import annotations

import re
import sys

import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import Agent, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
    for a in range(4)
    for b in range(4)
] * 4


async def test_cold_start_to_a_sample_in_five_calls(home, tiny_model):
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp", "serve"], env=server_env(home))
    async with Client(params) as client:
        instructions = client.instructions or ""
        assert str(home / "data") in instructions and "save_dataset" in instructions
        call = Agent(client)

        listed = await call("list_models", {"fits": True})  # 1: what can I train here?
        local = [c for c in listed["local"] if c.get("model") and "lora" in c["model"]["fits_methods"]]
        assert local, listed["local"]
        model = local[0]["path"]

        saved = await call("save_dataset", {"name": "sums", "rows": ROWS})  # 2: the data, from the conversation
        job = await call(
            "start_finetune",
            {
                "model": model,
                "method": "lora",
                "dataset": saved["path"],  # 3
                "max_steps": 20,
                "learning_rate": 5e-3,
                "max_seq_len": 64,
            },
        )
        assert job["next_step"].startswith("job_status(")
        status = (await call("job_status", {"job_id": job["job_id"], "wait_seconds": 30}))["job"]  # 4
        while status["state"] not in ("succeeded", "failed", "cancelled"):  # only on a slow machine
            status = (await call("job_status", {"job_id": job["job_id"], "wait_seconds": 30}))["job"]
        assert status["state"] == "succeeded", status
        out = await call(
            "sample",
            {
                "job_id": job["job_id"],
                "max_tokens": 4,  # 5
                "messages": [{"role": "user", "content": "What is 2 plus 1?"}],
            },
        )
    assert out["state"] == "done" and out["completions"][0]["completion_tokens"] > 0
    assert call.calls == 5, call.calls  # list, save, start, one 30 s wait, sample


async def test_the_server_states_its_home_in_the_instructions_and_schemas(home):
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp", "serve"], env=server_env(home))
    async with Client(params) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    dataset_doc = tools["start_finetune"].input_schema["properties"]["dataset"]["description"]
    assert re.search(rf"LLM_MCP_HOME \({re.escape(str(home))}\)", dataset_doc), dataset_doc
    assert {"datasets", "save_dataset"} <= set(tools)
    assert set(tools["start_finetune"].input_schema["required"]) == {"model", "method", "dataset"}
