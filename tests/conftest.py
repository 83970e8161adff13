"""Shared fixtures: a tiny local model (built once), per-test state dirs, server subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_mcp.core.matrix import load_matrix
from llm_mcp.core.methods.defaults import load_method_defaults
from llm_mcp.core.procs import free_port  # tests import it from here
from llm_mcp.core.settings import Settings, data_path
from llm_mcp.core.store import FINAL_STATES

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped unless torch sees a CUDA device (torch is imported only if there are any)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run pytest -m gpu on a GPU machine)")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def matrix():
    return load_matrix(data_path("models.yaml"))


@pytest.fixture(scope="session")
def defaults():
    return load_method_defaults()


@pytest.fixture(scope="session")
def tiny_model_template(tmp_path_factory) -> Path:
    from llm_mcp.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def settings(home) -> Settings:
    # In-process sampling unless a test asks for vLLM (tests/test_vllm.py).
    return Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def app(settings):
    """(AppState, MCPServer) over this test's state dir."""
    from llm_mcp.server import AppState, build_server

    state = AppState.load(settings)
    yield state, build_server(state)
    state.shutdown()


@pytest.fixture
def tiny_model(tiny_model_template, home) -> Path:
    """The tiny model, symlink-free, inside this test's LLM_MCP_HOME."""
    import shutil

    dest = home / "models" / "tiny"
    shutil.copytree(tiny_model_template, dest)
    return dest


def server_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MCP_")}
    env.update(LLM_MCP_HOME=str(home), PYTHONUNBUFFERED="1", LLM_MCP_SAMPLER="transformers")
    env.update(extra)
    return env


class RunningServer:
    def __init__(self, args: list[str], env: dict[str, str], port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_mcp", "serve", *args, "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not open its port within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def http_server(home):
    servers: list[RunningServer] = []

    def start(*args: str, **env: str) -> RunningServer:
        server = RunningServer(list(args), server_env(home, **env), free_port())
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


LEARNABLE_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "The sky is blue."},
        ]
    },
    {"prompt": "Q: What is 2 plus 3? A:", "completion": " The answer is 5."},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Red."},
        ]
    },
    {"text": "The cat sees a red ball. The cat sees a red ball."},
]


@pytest.fixture
def dataset(home) -> Path:
    """64 rows of four repeated examples: a tiny model learns them within a few dozen steps."""
    import json

    path = home / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(64)) + "\n")
    return path


async def wait_final(client, job_id: str, timeout: float = 600) -> dict:
    """Poll job_status (long-polling) until the job ends; returns its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 30})
        job = result.structured_content["job"]
        if job["state"] in FINAL_STATES:
            return job
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory, tiny_model_template):
    """The cluster tests' 2-process job (tests/clusters.py ARGS) run by the local executor: the losses every
    engine, on one node or two, must reproduce."""
    import json
    import shutil

    import anyio
    from mcp import Client

    from llm_mcp.server import AppState, build_server
    from tests.clusters import ARGS, losses, started

    home = tmp_path_factory.mktemp("local-ref")
    shutil.copytree(tiny_model_template, home / "models" / "tiny")
    (home / "data").mkdir()
    (home / "data" / "train.jsonl").write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(64)))
    state = AppState.load(Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers"))

    async def run() -> dict[int, float]:
        async with Client(build_server(state)) as client:
            job = await wait_final(client, await started(client, **ARGS), timeout=300)
        assert job["state"] == "succeeded", job
        return losses(state, job["job_id"])

    return anyio.run(run)


def processes_mentioning(*parts: str) -> list:
    """Running processes whose command line contains every one of `parts`."""
    import psutil

    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if all(part in " ".join(p.info.get("cmdline") or []) for part in parts)
    ]


def trained_home(root: Path, template: Path, train: dict, methods: tuple[str, ...]) -> tuple[Path, dict[str, str]]:
    """A state dir under `root` with the tiny model (models/tiny), LEARNABLE_ROWS (data/train.jsonl) and one
    finished job per method, trained through the MCP tools in-process. Returns (home, {method: job_id})."""
    import json
    import shutil

    import anyio
    from mcp import Client

    from llm_mcp.server import AppState, build_server

    home = root / "home"
    shutil.copytree(template, home / "models" / "tiny")
    (home / "data").mkdir()
    (home / "data" / "train.jsonl").write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(64)))

    async def run() -> dict[str, str]:
        state = AppState.load(Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers"))
        ids = {}
        async with Client(build_server(state)) as client:
            for method in methods:
                r = await client.call_tool("start_finetune", {**train, "method": method})
                assert not r.is_error, r.content[0].text
                ids[method] = r.structured_content["job_id"]
            for job_id in ids.values():
                assert (await wait_final(client, job_id))["state"] == "succeeded", job_id
        return ids

    return home, anyio.run(run)


class Agent:
    """An agent's side of a session: each tool call counted, each error a test failure naming the tool."""

    def __init__(self, client):
        self.client, self.calls = client, 0

    async def __call__(self, tool: str, args: dict) -> dict:
        self.calls += 1
        result = await self.client.call_tool(tool, args)
        assert not result.is_error, f"{tool}: {result.content[0].text}"
        return result.structured_content
