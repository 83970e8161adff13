"""Property-based fuzzing of every tool's arguments through the MCP client.

Wrong types, huge and negative numbers, NaN and infinity, path characters, empty and long strings,
unknown keys, and the ids of real finished jobs of every method: every call must end in a valid
result or a tool error that keeps the error contract: it says what was wrong (no masked crash,
"Error executing tool NAME" and nothing else), shows no traceback, and names no path the caller
did not give outside the state directory.
"""

from __future__ import annotations

import re

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.text(alphabet="/.\\\x00~ ", max_size=40),
    st.sampled_from(["../../etc/passwd", "/dev/zero", "", "lora", "final"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
TOOLS = {
    "list_models": ["model", "method", "type", "family", "fits", "gpu_memory_gb", "num_gpus"],
    "start_finetune": [
        "model",
        "method",
        "dataset",
        "max_steps",
        "epochs",
        "learning_rate",
        "lora_rank",
        "batch_size",
        "max_seq_len",
        "target_modules",
        "density",
        "sparsity_ratio",
        "resume_from",
        "eval_fraction",
        "name",
        "num_processes",
    ],
    "job_status": ["job_id"],
    "cancel_job": ["job_id"],
    "sample": [
        "job_id",
        "adapter",
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "n",
        "checkpoint",
        "messages",
        "stop",
        "top_p",
    ],
    "export_adapter": ["job_id", "format", "destination", "checkpoint"],
    "serve_adapter": ["job_id", "checkpoint"],
}


TRAIN = dict(
    model="models/tiny",
    dataset="data/train.jsonl",
    max_steps=4,
    learning_rate=5e-3,
    lora_dropout=0.0,
    max_seq_len=32,
    checkpoint_every=2,
)
METHODS = ("lora", "qlora", "dora", "sparse")
PATH = re.compile(r"(?<![\w.~])/(?:[\w.@+-]+/)+[\w.@+-]*")
URL_OR_HTTP_PATH = re.compile(r"\bhttps?://\S+|\b(?:GET|POST|PUT|DELETE) /\S*")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_template):
    """A state dir with a finished job of every method; vLLM 'runs' at a dead address, so serve_adapter fails fast."""
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.server import AppState, build_server
    from tests.conftest import trained_home

    home, ids = trained_home(tmp_path_factory.mktemp("fuzz"), tiny_model_template, TRAIN, METHODS)
    state = AppState.load(
        Settings(
            home=home,
            models_path=data_path("models.yaml"),
            sampler="transformers",
            vllm_url="http://127.0.0.1:9",
            sample_timeout_s=0.5,
        )
    )
    return state, build_server(state), list(ids.values())


def _foreign_paths(text: str, args: dict, home: str) -> list[str]:
    """Absolute paths in an error that are neither under the state dir nor (resolved from) what the caller gave."""
    import os

    given = " ".join(str(v) for v in args.values())
    mine = (home, os.path.expanduser("~")) if "~" in given else (home,)
    text = URL_OR_HTTP_PATH.sub(" ", text)  # "vLLM at http://host:9 did not answer GET /v1/models" names no file
    return [
        p
        for p in PATH.findall(text)
        if not p.startswith(mine)
        and p not in given
        and p.rstrip(".") not in given
        and not (".." in given and home.startswith(p))
    ]  # '..' from the state dir resolves to its parent


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(tool=st.sampled_from(sorted(TOOLS)), data=st.data())
def test_every_tool_call_ends_cleanly(fuzz_server, tool, data):
    state, server, job_ids = fuzz_server
    keys = data.draw(st.lists(st.sampled_from([*TOOLS[tool], "unknown_key"]), unique=True, max_size=5))
    args = {k: data.draw(st.one_of(JUNK, st.sampled_from(job_ids)) if k == "job_id" else JUNK) for k in keys}
    if tool == "start_finetune":
        args["dry_run"] = True  # validation is what is fuzzed; nothing may start

    async def call():
        async with Client(server) as client:
            return await client.call_tool(tool, args)

    result = anyio.run(call)
    text = result.content[0].text if result.content else ""
    if result.is_error:
        assert text.strip() != f"Error executing tool {tool}", f"masked crash for {args!r}"
        assert "Traceback" not in text and 'File "' not in text, text
        assert not _foreign_paths(text, args, str(state.settings.home.resolve())), (text, args)
        assert 20 < len(text) < 20_000, text
    assert len(state.store.list()) == len(METHODS)  # no job was ever created
