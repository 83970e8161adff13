"""The MCP server through real clients: in-memory, stdio subprocess, streamable HTTP and SSE."""

from __future__ import annotations

import subprocess
import sys

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.conftest import server_env

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(app):
    return app[1]


async def test_tools_are_listed_with_annotations(server):
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    tool = tools["list_models"]
    assert tool.annotations.read_only_hint is True and tool.annotations.open_world_hint is False
    assert "Weight-Decomposed" in tool.description
    assert set(tool.input_schema["properties"]["method"]["anyOf"][0]["enum"]) == {"lora", "qlora", "dora", "sparse"}


async def test_list_models_returns_the_whole_matrix(server, matrix):
    async with Client(server) as client:
        result = await client.call_tool("list_models", {})
    assert not result.is_error
    data = result.structured_content
    assert data["count"] == len(matrix.models) == len(data["models"])
    assert {m["id"] for m in data["models"]} == {e.id for e in matrix.models}
    assert "Qwen/Qwen3-8B" in result.content[0].text


async def test_one_model_in_full_by_alias(server):
    async with Client(server) as client:
        result = await client.call_tool("list_models", {"model": "mistralai/mistral-7b", "gpu_memory_gb": 24})
    (model,) = result.structured_content["models"]
    assert model["id"] == "mistralai/Mistral-7B-v0.1"
    assert model["dims"]["hidden_size"] == 4096 and model["target_modules"]
    lora = next(m for m in model["methods"] if m["method"] == "lora")
    assert lora["memory"]["total_gb"] == lora["estimated_memory_gb"] and lora["fits"] is True
    assert result.structured_content["hardware"]["source"] == "hypothetical"
    assert "DoRA (Weight-Decomposed Low-Rank Adaptation)" in result.content[0].text


async def test_local_model_in_full(server, tiny_model):
    async with Client(server) as client:
        result = await client.call_tool("list_models", {"model": "models/tiny"})
    (model,) = result.structured_content["models"]
    assert model["local_path"] == str(tiny_model) and model["hf_architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "args,expected",
    [
        ({"model": "Qwen/Qwen3-7B"}, ["'Qwen/Qwen3-7B'", "Did you mean", "Qwen/Qwen3-8B"]),
        ({"type": "chat"}, ["type", "'base'", "'instruct'"]),
        ({"method": "full"}, ["method", "'lora'", "'sparse'"]),
        ({"family": "gpt5"}, ["'gpt5'", "allowed", "qwen3"]),
        ({"gpu_memory_gb": -3}, ["gpu_memory_gb", "greater than 0"]),
        ({"model": "/etc"}, ["outside the allowed roots", "system directory"]),
    ],
)
async def test_bad_arguments_get_a_clear_error(server, args, expected):
    async with Client(server) as client:
        result = await client.call_tool("list_models", args)
    assert result.is_error
    text = result.content[0].text
    for fragment in expected:
        assert fragment in text, (fragment, text)
    assert "Traceback" not in text


async def test_matrix_resource(server, settings):
    async with Client(server) as client:
        res = await client.read_resource("llm-mcp://models.yaml")
    assert res.contents[0].text == settings.models_path.read_text()


def test_server_start_does_not_import_torch():
    code = (
        "import sys, llm_mcp.cli, llm_mcp.server, llm_mcp.http; "
        "print(sorted(m for m in ('torch','transformers','peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_stdio_subprocess_session(home, matrix):
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp"], env=server_env(home))
    async with Client(params) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        result = await client.call_tool("list_models", {"method": "qlora", "fits": True, "gpu_memory_gb": 24})
    assert "list_models" in tools
    ids = {m["id"] for m in result.structured_content["models"]}
    assert "Qwen/Qwen3-8B" in ids and "meta-llama/Llama-3.1-70B" not in ids


def test_invalid_matrix_stops_the_server_with_every_problem(home, tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("version: 1\nmodels:\n- id: a/b\n  family: x\n  type: chatbot\n")
    proc = subprocess.run(
        [sys.executable, "-m", "llm_mcp", "serve", "--models", str(bad)],
        env=server_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert "models[0] (a/b) type" in proc.stderr and "'chatbot'" in proc.stderr
    assert "models[0] (a/b) dims: Field required" in proc.stderr


def test_non_loopback_bind_without_token_is_refused(home):
    proc = subprocess.run(
        [sys.executable, "-m", "llm_mcp", "serve", "--transport", "streamable-http", "--host", "0.0.0.0"],
        env=server_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "LLM_MCP_AUTH_TOKEN" in proc.stderr


async def test_streamable_http_session(http_server, matrix):
    srv = http_server("--transport", "streamable-http")
    async with Client(f"{srv.url}/mcp") as client:
        result = await client.call_tool("list_models", {})
    assert result.structured_content["count"] == len(matrix.models)


async def test_sse_session(http_server):
    srv = http_server("--transport", "sse")
    async with Client(sse_client(f"{srv.url}/sse")) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
    assert "list_models" in tools


async def test_bearer_token_is_required_when_configured(http_server):
    srv = http_server("--transport", "streamable-http", LLM_MCP_AUTH_TOKEN="s3cret")
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    headers = {"accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient() as http:
        missing = await http.post(f"{srv.url}/mcp", json=init, headers=headers)
        wrong = await http.post(f"{srv.url}/mcp", json=init, headers={**headers, "authorization": "Bearer nope"})
    assert missing.status_code == 401 and "missing bearer token" in missing.text
    assert wrong.status_code == 401 and "invalid bearer token" in wrong.text
    http_client = create_mcp_http_client(headers={"Authorization": "Bearer s3cret"})
    async with Client(streamable_http_client(f"{srv.url}/mcp", http_client=http_client)) as client:
        assert "list_models" in [t.name for t in (await client.list_tools()).tools]


async def test_foreign_host_and_origin_are_rejected(http_server):
    srv = http_server("--transport", "streamable-http")
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    async with httpx2.AsyncClient() as http:
        evil_host = await http.post(f"{srv.url}/mcp", json=init, headers={**headers, "host": "evil.example:80"})
        evil_origin = await http.post(f"{srv.url}/mcp", json=init, headers={**headers, "origin": "http://evil.example"})
    assert evil_host.status_code in (400, 403, 421)
    assert evil_origin.status_code in (400, 403)
