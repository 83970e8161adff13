"""What a careless or hostile caller could still break (issue 14): each attack is refused or bounded.

`pytest -m reliability` runs these with the rest of the reliability suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import LEARNABLE_ROWS, processes_mentioning, server_env, trained_home

pytestmark = [pytest.mark.anyio, pytest.mark.reliability]
TRAIN = dict(
    model="models/tiny",
    dataset="data/train.jsonl",
    max_steps=12,
    learning_rate=5e-3,
    lora_dropout=0.0,
    max_seq_len=64,
    checkpoint_every=6,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_template):
    """A state dir with a finished LoRA and sparse job."""
    return trained_home(tmp_path_factory.mktemp("sec"), tiny_model_template, TRAIN, ("lora", "sparse"))


@pytest.fixture
def served(finished):
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.server import AppState, build_server

    state = AppState.load(Settings(home=finished[0], models_path=data_path("models.yaml"), sampler="transformers"))
    yield state, build_server(state)
    state.shutdown()


async def call(server, tool, **args):
    async with Client(server) as client:
        return await client.call_tool(tool, args)


# --- 1. export destinations never land in the state directory's internals ----------------------------


async def test_exports_cannot_plant_files_in_the_state_directory(served, finished):
    _, server = served
    home, ids = finished
    job = ids["lora"]
    for dest in (
        home / "jobs.db-wal",
        home / "jobs.db-journal",
        home / "jobs" / job / "checkpoints" / "step-000099",
        home / "data" / "x",
        home / "exports",
    ):
        r = await call(server, "export_adapter", job_id=job, destination=str(dest))
        assert r.is_error and "inside the state directory" in r.content[0].text, (dest, r.content[0].text)
        # nothing was written there (jobs.db-wal may exist: it is SQLite's own file while the store is open)
        assert not dest.is_dir() or dest == home / "exports"
    r = await call(server, "job_status", job_id=job)
    assert not r.is_error and [c["step"] for c in r.structured_content["job"]["checkpoints"]] == [6]
    ok = await call(server, "export_adapter", job_id=job, destination="mine/adapter")
    assert not ok.is_error and ok.structured_content["destination"] == str(
        home.resolve() / "exports" / "mine" / "adapter"
    )


# --- 2. sample work is bounded, and stops when the caller goes away ------------------------------------


async def test_sample_refuses_more_tokens_than_the_context_and_stops_at_its_time_budget(served, finished):
    state, server = served
    _, ids = finished
    t0 = time.monotonic()
    r = await call(server, "sample", job_id=ids["lora"], prompt="word " * 3000, max_tokens=16)
    assert r.is_error and "exceed" in r.content[0].text and "context of 2,048" in r.content[0].text
    assert time.monotonic() - t0 < 20
    state.settings.sample_timeout_s = 0.5
    for seed in range(6):  # the untrained base seldom samples its end token; a seed where it does is skipped
        t0 = time.monotonic()
        r = await call(server, "sample", model="models/tiny", prompt="The", max_tokens=2000, temperature=1.0, seed=seed)
        assert not r.is_error, r.content[0].text
        assert time.monotonic() - t0 < 15
        done = r.structured_content["completions"][0]
        if done["finish_reason"] != "stop":
            break
    assert done["finish_reason"] == "time_limit" and done["completion_tokens"] < 2000, done


@pytest.mark.slow
async def test_a_sample_whose_client_disconnects_does_not_keep_the_stdio_server_running(finished):
    home, ids = finished
    env = server_env(home, LLM_MCP_SAMPLE_TIMEOUT_S="600")
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp", "serve"], env=env)
    with anyio.move_on_after(12):  # the client goes away mid-generation
        async with Client(params) as client:
            await client.call_tool(
                "sample", {"job_id": ids["lora"], "prompt": "The", "max_tokens": 4000, "temperature": 1.0, "seed": 3}
            )

    def ours() -> list:
        found = []
        for p in processes_mentioning("llm_mcp", "serve"):
            try:
                if p.environ().get("LLM_MCP_HOME") == str(home):
                    found.append(p)
            except Exception:  # it ended meanwhile
                pass
        return found

    deadline = time.monotonic() + 20
    while ours() and time.monotonic() < deadline:
        await anyio.sleep(0.5)
    assert not ours(), "the stdio server kept generating after its client left"


# --- 3. abandoned HTTP sessions are closed, and their number is capped ----------------------------------


def _open_session(url: str) -> int:
    import httpx

    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    r = httpx.post(url, json=body, headers={"Accept": "application/json, text/event-stream"}, timeout=10)
    return r.status_code


def test_http_sessions_expire_when_idle_and_are_capped(http_server):
    server = http_server("--transport", "streamable-http", LLM_MCP_SESSION_IDLE_S="2", LLM_MCP_MAX_SESSIONS="4")
    url = f"{server.url}/mcp"
    assert [_open_session(url) for _ in range(4)] == [200] * 4
    assert _open_session(url) == 503  # a fifth is refused while four are open
    time.sleep(4)  # ... until the idle ones are closed
    assert _open_session(url) == 200


# --- 4. a dead merge never blocks later merges --------------------------------------------------------


def test_merge_locks_are_exclusive_and_go_stale_with_their_owner(tmp_path):
    from llm_mcp.inference.merge import _claim, _stale

    lock = tmp_path / ".x.lock"
    assert _claim(lock, {"n": 1}) and not _claim(lock, {"n": 2})  # exclusive, while its claim is fresh
    data = json.loads(lock.read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data["owner"] = {"pid": dead.pid, "started_at": time.time() - 5}
    lock.write_text(json.dumps(data))
    assert _stale(lock) and _claim(lock, {"n": 3})  # the owner is gone: the lock is taken over
    assert json.loads(lock.read_text())["spec"] == {"n": 3}
    data = json.loads(lock.read_text())
    import psutil

    data["owner"] = {"pid": os.getpid(), "started_at": psutil.Process().create_time()}
    lock.write_text(json.dumps(data))
    assert not _stale(lock) and not _claim(lock, {"n": 4})  # a live owner keeps it


async def test_a_killed_merge_is_reported_and_the_next_call_merges(served, finished):
    _, server = served
    home, ids = finished
    dest = home / "exports" / f"{ids['lora']}-final-merged"
    lock = dest.with_name(f".{dest.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"spec": {}, "owner": {"pid": dead.pid, "started_at": 1.0}, "claimed_at": 1.0}))
    r = await call(server, "export_adapter", job_id=ids["lora"], format="merged")
    assert not r.is_error and r.structured_content["state"] == "done", r.content[0].text
    assert not lock.exists() and (dest / "config.json").exists()


# --- 5. what a job trains on is what was validated ---------------------------------------------------


def test_a_dataset_swapped_after_validation_is_refused_by_the_trainer(tmp_path, tiny_model_template):
    import shutil

    from llm_mcp.core.hardware import detect
    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.core.matrix import load_matrix
    from llm_mcp.core.methods.defaults import load_method_defaults
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.core.store import JobStore
    from llm_mcp.validation.finetune import ValidationContext, resolve_finetune
    from llm_mcp.validation.requests import FinetuneRequest

    home = tmp_path / "home"
    shutil.copytree(tiny_model_template, home / "models" / "tiny")
    data = home / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(16)) + "\n")
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"text": "secret " * 20}) + "\n")
    resolved = resolve_finetune(
        FinetuneRequest.parse(
            {
                "model": "models/tiny",
                "method": "lora",
                "dataset": "data/train.jsonl",
                "max_steps": 1,
                "max_seq_len": 32,
            },
            "start_finetune",
        ),
        ValidationContext(
            matrix=load_matrix(data_path("models.yaml")),
            settings=Settings(home=home, models_path=data_path("models.yaml")),
            defaults=load_method_defaults(),
            hardware=detect(),
            store=JobStore(home),
        ),
    )
    job_dir = home / "jobs" / "ft-swap"
    job_dir.mkdir(parents=True)
    JobConfig.parse({**resolved.config.model_dump(), "job_id": "ft-swap"}).write(job_dir)
    data.unlink()
    data.symlink_to(outside)  # swapped for a link to a file outside the allowed roots
    out = subprocess.run(
        [sys.executable, "-m", "llm_mcp.train.run", str(job_dir)], capture_output=True, text=True, timeout=300
    )
    result = json.loads((job_dir / "result.json").read_text())
    assert out.returncode == 1 and result["state"] == "failed"
    assert "changed after start_finetune validated it" in result["error"], result


# --- 6. queued jobs are capped -----------------------------------------------------------------------


async def test_start_finetune_refuses_past_the_queue_cap(app, tiny_model, dataset):
    state, server = app
    state.settings.max_queued = 0
    r = await call(
        server, "start_finetune", model="models/tiny", method="lora", dataset="data/train.jsonl", max_steps=2
    )
    assert r.is_error and "LLM_MCP_MAX_QUEUED=0" in r.content[0].text and "cancel_job" in r.content[0].text
    assert state.store.list() == []


# --- 7. no tracebacks or foreign paths for the agent; clear errors for odd paths -----------------------


def test_job_status_shows_the_cause_not_the_traceback(tmp_path):
    from llm_mcp.core.jobdir import public_log, redact_paths

    home = tmp_path / "home"
    tail = [
        "[10:00:01] step 3",
        "Traceback (most recent call last):",
        f'  File "{sys.prefix}/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1, in _call',
        "    return forward_call(*args, **kwargs)",
        "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
        f"RuntimeError: boom in {sys.prefix}/lib/x.py while reading {home}/data/train.jsonl",
    ]
    shown = public_log(tail, home)
    assert shown == ["[10:00:01] step 3", f"RuntimeError: boom in .../x.py while reading {home}/data/train.jsonl"]
    assert sys.prefix not in redact_paths(f"error at {sys.prefix}/bin/python", home)


async def test_odd_paths_get_clear_errors(app):
    _, server = app
    r = await call(
        server, "start_finetune", model="models/tiny", method="lora", dataset="data/a\x00b.jsonl", dry_run=True
    )
    assert r.is_error and "NUL byte" in r.content[0].text
    r = await call(
        server, "start_finetune", model="models/tiny", method="lora", dataset="data/" + "x" * 300, dry_run=True
    )
    assert r.is_error and "too long" in r.content[0].text and "disk space" not in r.content[0].text


# --- 8. races between claiming, starting and cancelling a job ------------------------------------------


def _running_row(state, job_id: str, config) -> None:
    from llm_mcp.core.store import Job

    state.store.insert(
        Job(
            id=job_id,
            name=job_id,
            state="queued",
            model="tiny",
            method="lora",
            device_set="other",
            created_at=time.time(),
            config=config,
        )
    )
    state.store.update(job_id, state="running", started_at=time.time() - 120)  # claimed 2 minutes ago, no pid
    state.store.job_dir(job_id).mkdir(parents=True, exist_ok=True)
    config.model_copy(update={"job_id": job_id}).write(state.store.job_dir(job_id))


async def test_a_supervisor_whose_pid_was_never_recorded_is_adopted_and_a_lost_cancel_still_stops_it(
    app, tiny_model, dataset
):
    from llm_mcp.jobs.local import reconcile

    state, server = app
    dry = await call(
        server,
        "start_finetune",
        model="models/tiny",
        method="lora",
        dataset="data/train.jsonl",
        max_steps=3,
        max_seq_len=32,
        dry_run=True,
    )
    from llm_mcp.core.jobconfig import JobConfig

    config = JobConfig.parse(dry.structured_content["config"])
    _running_row(state, "ft-orphan", config)
    _running_row(state, "ft-cancelled", config)
    state.executor.cancel("ft-cancelled")  # no pid known: only recorded
    env = server_env(state.settings.home)
    procs = [
        subprocess.Popen([sys.executable, "-m", "llm_mcp.jobs.supervisor", str(state.settings.home), j], env=env)
        for j in ("ft-orphan", "ft-cancelled")
    ]
    deadline = time.monotonic() + 30
    while state.store.get("ft-orphan").pid is None and time.monotonic() < deadline:
        time.sleep(0.1)
    reconcile(state.store)  # a restarted server: the orphan has a live supervisor, so it is not failed
    for p in procs:
        p.wait(timeout=240)
    assert state.store.get("ft-orphan").state == "succeeded"
    cancelled = state.store.get("ft-cancelled")
    assert cancelled.state == "cancelled" and not (state.store.job_dir("ft-cancelled") / "adapter").exists()


# --- 9. the in-process sampler never mixes two sparse adapters -----------------------------------------


def test_switching_sparse_adapters_leaves_nothing_of_the_previous_one(tmp_path, tiny_model_template):
    import torch
    from transformers import AutoModelForCausalLM

    from llm_mcp.inference.sampling import SampleParams, TransformersSampler
    from llm_mcp.inference.targets import Target
    from llm_mcp.modeling.sparse import attach_sparse_deltas, save_sparse, sparse_modules

    def adapter(name: str, targets: list[str], seed: int) -> Path:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_template)
        attach_sparse_deltas(model, targets, 0.05, 4, seed)
        g = torch.Generator().manual_seed(seed)
        for m in sparse_modules(model).values():
            m.values.data = torch.randn(m.k, generator=g) * 0.5
        save_sparse(model, tmp_path / name, {"base_model_name_or_path": "tiny", "target_modules": targets})
        return tmp_path / name

    a, b = adapter("a", ["q_proj", "v_proj"], 1), adapter("b", ["o_proj"], 2)
    params = SampleParams(prompt="The cat", max_tokens=8, logprobs=True)
    target = lambda p: Target(base_path=str(tiny_model_template), base_id="tiny", adapter_path=str(p), layout="sparse")  # noqa: E731
    shared = TransformersSampler()
    shared.generate(target(a), params)
    after_a = shared.generate(target(b), params).completions[0]
    alone = TransformersSampler().generate(target(b), params).completions[0]
    assert after_a.text == alone.text and after_a.logprobs == alone.logprobs
    back = shared.generate(target(a), params).completions[0]  # and back, without a KeyError
    assert back == TransformersSampler().generate(target(a), params).completions[0]


# --- 10. merged exports are not re-hashed on every call; dependencies are declared ----------------------


async def test_a_merged_export_is_hashed_once(served, finished, monkeypatch):
    import llm_mcp.inference.card as card

    _, server = served
    _, ids = finished
    first = await call(server, "export_adapter", job_id=ids["sparse"], format="merged")
    assert not first.is_error and first.structured_content["state"] == "done", first.content[0].text
    hashed = []
    real = card.sha256_file
    monkeypatch.setattr(card, "sha256_file", lambda p: hashed.append(p) or real(p))
    again = await call(server, "export_adapter", job_id=ids["sparse"], format="merged")
    assert again.structured_content["reused"] and again.structured_content["files"] == first.structured_content["files"]
    assert hashed == []


def test_every_runtime_import_is_a_declared_dependency():
    """Third-party modules the package imports are declared in pyproject (or come with a declared package, listed)."""
    import ast
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    declared = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower().replace("-", "_") for d in names}
    declared |= {
        "yaml",
        "safetensors",
        "numpy",
        "pyarrow",
        "huggingface_hub",
        "mcp_types",
        "starlette",
        "jinja2",
        "peft",
        "anyio",
        "llama_cpp",
        "conversion",
    }  # imported through a declared package (pyyaml, mcp, transformers, datasets, llama-cpp-python: its module and
    # the converter package `llm-mcp setup-gguf` unpacks from its source)
    imported = set()
    for path in (root / "llm_mcp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "llm_mcp"}
    assert "httpx" in third_party and third_party <= declared, sorted(third_party - declared)
