"""Property-based fuzzing of every tool's arguments through the MCP client.

Wrong types, huge and negative numbers, NaN and infinity, path characters, empty and long strings,
unknown keys: every call must end in a valid result or a clean tool error that says what was
wrong. A masked crash ("Error executing tool NAME" and nothing else) or traceback text fails.
"""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300),
    st.text(alphabet="/.\\\x00~ ", max_size=40), st.sampled_from(["../../etc/passwd", "/dev/zero", "", "lora", "final"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
TOOLS = {
    "list_models": ["model", "method", "type", "family", "fits", "gpu_memory_gb", "num_gpus"],
    "start_finetune": ["model", "method", "dataset", "max_steps", "epochs", "learning_rate", "lora_rank",
                       "batch_size", "max_seq_len", "target_modules", "density", "sparsity_ratio", "resume_from",
                       "eval_fraction", "name", "num_processes"],
    "job_status": ["job_id"],
    "cancel_job": ["job_id"],
    "sample": ["job_id", "adapter", "model", "prompt", "max_tokens", "temperature", "n", "checkpoint", "messages",
               "stop", "top_p"],
    "export_adapter": ["job_id", "format", "destination", "checkpoint"],
    "serve_adapter": ["job_id", "checkpoint"],
}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from llm_mcp.server import AppState, build_server
    from llm_mcp.core.settings import Settings, data_path

    home = tmp_path_factory.mktemp("fuzz")
    state = AppState.load(Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers"))
    return state, build_server(state)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(tool=st.sampled_from(sorted(TOOLS)), data=st.data())
def test_every_tool_call_ends_cleanly(fuzz_server, tool, data):
    state, server = fuzz_server
    keys = data.draw(st.lists(st.sampled_from([*TOOLS[tool], "unknown_key"]), unique=True, max_size=5))
    args = {k: data.draw(JUNK) for k in keys}
    if tool == "start_finetune":
        args["dry_run"] = True  # validation is what is fuzzed; nothing may start

    async def call():
        async with Client(server) as client:
            return await client.call_tool(tool, args)

    result = anyio.run(call)
    text = result.content[0].text if result.content else ""
    if result.is_error:
        assert text.strip() != f"Error executing tool {tool}", f"masked crash for {args!r}"
        assert "Traceback" not in text
        assert len(text) < 20_000
    assert state.store.list() == []  # no job was ever created
