"""The Slurm and Ray executors against real single-node clusters, through the MCP tools.

Per engine: a 2-process LoRA job succeeds with the same losses as the same job run locally and its adapter
samples; cancel ends 'cancelled' with a checkpoint and the resume continues exactly; a restarted server
(a new process) re-attaches to a running job; a job stopped from outside (scancel / ray job stop) ends
'failed' with that cause. Clusters start once per session (tests/clusters.py). Skip locally with -m "not cluster".
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from llm_mcp.core.jobdir import read_metrics
from llm_mcp.core.settings import Settings, data_path
from tests.clusters import start_ray, start_slurm, stop_ray, stop_slurm
from tests.conftest import LEARNABLE_ROWS, server_env, wait_final

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.cluster]
ARGS = dict(
    model="models/tiny",
    method="lora",
    dataset="data/train.jsonl",
    learning_rate=5e-3,
    lora_dropout=0.1,
    batch_size=4,
    max_seq_len=64,
    max_steps=120,
    num_processes=2,
    checkpoint_every=0,
)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    env = start_slurm(root)
    yield env
    stop_slurm(root, env)


@pytest.fixture(scope="session")
def ray_address():
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay under 107 characters
    address = start_ray(root)
    yield address
    stop_ray(root)


@pytest.fixture(params=["slurm", "ray"])
def engine(request, monkeypatch):
    """(name, environment a server needs to use it); the cluster starts on first use."""
    if request.param == "slurm":
        env = request.getfixturevalue("slurm")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return "slurm", dict(env)
    address = request.getfixturevalue("ray_address")
    return "ray", {"LLM_MCP_RAY_ADDRESS": address}


def cluster_app(home, name: str, env: dict[str, str]):
    from llm_mcp.server import AppState, build_server

    settings = Settings(
        home=home,
        models_path=data_path("models.yaml"),
        sampler="transformers",
        executor=name,
        ray_address=env.get("LLM_MCP_RAY_ADDRESS", "http://127.0.0.1:8265"),
    )
    state = AppState.load(settings)
    state.startup()
    return state, build_server(state)


async def started(client, **args) -> str:
    result = await client.call_tool("start_finetune", args)
    assert not result.is_error, result.content[0].text
    return result.structured_content["job_id"]


def losses(state, job_id: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(state.store.job_dir(job_id)) if "loss" in m}


async def wait_step(client, state, job_id: str, step: int) -> None:
    for _ in range(120):
        if losses(state, job_id) and max(losses(state, job_id)) >= step:
            return
        result = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 1})
        assert result.structured_content["job"]["state"] in ("queued", "running"), result.content[0].text
    raise AssertionError(f"{job_id} did not reach step {step}")


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, tiny_model_template):
    """The same 2-process job run by the local executor: the losses every engine must reproduce."""
    import anyio

    from llm_mcp.server import AppState, build_server

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


async def test_a_job_runs_on_the_cluster_like_locally_and_cancel_resume_is_exact(
    engine, home, tiny_model, dataset, local_reference
):
    name, env = engine
    state, server = cluster_app(home, name, env)
    async with Client(server) as client:
        dry = await client.call_tool("start_finetune", {**ARGS, "dry_run": True})
        assert dry.structured_content["submission"]["kind"] == ("sbatch" if name == "slurm" else "ray job")
        job_id = await started(client, **ARGS)
        job = await wait_final(client, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        assert job["engine"] == name and job["engine_job_id"] and job["nodes"], job
        ran = losses(state, job_id)
        assert sorted(ran) == sorted(local_reference) == list(range(1, 121))
        for step, loss in local_reference.items():
            assert ran[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
        sample = await client.call_tool("sample", {"job_id": job_id, "prompt": "The cat", "max_tokens": 6})
        assert not sample.is_error and sample.structured_content["completions"][0]["completion_tokens"] > 0

        args = ARGS
        stopped = await started(client, **args)
        await wait_step(client, state, stopped, 3)
        result = await client.call_tool("cancel_job", {"job_id": stopped})
        assert not result.is_error, result.content[0].text
        job = await wait_final(client, stopped, timeout=300)
        assert job["state"] == "cancelled" and job["checkpoints"], job
        at = job["checkpoints"][-1]["step"]
        resumed = await started(client, **args, resume_from=stopped)
        job = await wait_final(client, resumed, timeout=300)
    state.shutdown()
    assert job["state"] == "succeeded", job
    assert 3 <= at < 120
    rest = losses(state, resumed)
    assert sorted(rest) == list(range(at + 1, 121))
    for step, loss in rest.items():  # the resumed run continues the uninterrupted one exactly
        assert loss == pytest.approx(local_reference[step], rel=1e-4, abs=1e-5), step


async def test_a_restarted_server_reattaches_and_an_outside_cancel_fails_the_job(engine, home, tiny_model, dataset):
    name, env = engine
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "llm_mcp", "serve", "--executor", name], env=server_env(home, **env)
    )
    async with Client(params) as client:
        job_id = await started(client, **{**ARGS, "num_processes": 1, "max_steps": 2000, "checkpoint_every": 3})
    async with Client(params) as client:  # a new server process
        for _ in range(120):
            status = (await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 1})).structured_content[
                "job"
            ]
            if status["state"] == "running" and status["checkpoints"]:
                break
        assert status["state"] == "running" and status["engine_job_id"], status
        engine_id = status["engine_job_id"]
        if name == "slurm":
            subprocess.run(["scancel", engine_id], check=True)
        else:
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "job",
                    "stop",
                    "--address",
                    env["LLM_MCP_RAY_ADDRESS"],
                    "--no-wait",
                    engine_id,
                ],
                check=True,
                capture_output=True,
            )
        job = await wait_final(client, job_id, timeout=180)
    assert job["state"] == "failed", job
    assert ("scancel" if name == "slurm" else "ray job stop") in job["error"], job
    assert f"resume_from='{job_id}'" in job["next_step"], job


async def test_slurm_multi_node_dry_run_and_a_pending_job_is_queued_until_cancelled(
    slurm, monkeypatch, home, tiny_model, dataset
):
    """Partition `multi` has 2 nodes, one never up: a 2-node job is accepted and waits in Slurm's queue."""
    from llm_mcp.server import AppState, build_server

    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    settings = Settings(
        home=home,
        models_path=data_path("models.yaml"),
        sampler="transformers",
        executor="slurm",
        slurm={"partition": "multi", "time_limit": "00:30:00"},
    )
    state = AppState.load(settings)
    args = {**ARGS, "num_processes": 2, "nodes": 2, "max_steps": 5}
    async with Client(build_server(state)) as client:
        listing = await client.call_tool("list_models", {"model": "models/tiny"})
        assert listing.structured_content["hardware"]["nodes"] == 2
        dry = await client.call_tool("start_finetune", {**args, "dry_run": True, "scheduler": {"account": "lab-1"}})
        assert not dry.is_error, dry.content[0].text
        script = dry.structured_content["submission"]["script"]
        for line in (
            "#SBATCH --nodes=2",
            "#SBATCH --partition=multi",
            "#SBATCH --time=00:30:00",
            "#SBATCH --account=lab-1",
        ):
            assert line in script.splitlines(), script
        srun = next(ln for ln in script.splitlines() if ln.startswith("srun ") and "accelerate" in ln)
        words = shlex.split(srun)
        task = words[words.index("-c") + 1]  # what each node's bash receives: the variables still unexpanded
        assert "--machine_rank $SLURM_NODEID" in task and "--main_process_ip $MAIN_ADDR" in task
        assert "--num_machines 2" in task and "--num_processes 2" in task
        assert "sbatch --parsable" in dry.content[0].text and "#!/bin/bash" in dry.content[0].text
        bad = await client.call_tool("start_finetune", {**args, "scheduler": {"partition": "x --wrap=id"}})
        assert bad.is_error and "scheduler.partition" in bad.content[0].text
        too_many = await client.call_tool("start_finetune", {**args, "nodes": 3, "num_processes": 3})
        assert too_many.is_error and "nodes=3" in too_many.content[0].text

        job_id = await started(client, **args)
        for _ in range(30):  # the server's job watcher reads squeue every few seconds
            status = (await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 1})).structured_content[
                "job"
            ]
            if (status["queue_state"] or "").startswith("PENDING"):
                break
        assert status["state"] == "queued" and status["queue_state"].startswith("PENDING"), status
        assert (
            f"slurm job {status['engine_job_id']}: PENDING"
            in (await client.call_tool("job_status", {"job_id": job_id})).content[0].text
        )
        cancelled = await client.call_tool("cancel_job", {"job_id": job_id})
        assert cancelled.structured_content["job"]["state"] == "cancelled"
    out = subprocess.run(["squeue", "-h", "-j", status["engine_job_id"], "-o", "%T"], capture_output=True, text=True)
    assert out.stdout.strip() in ("", "CANCELLED")
    assert not (state.store.job_dir(job_id) / "train.log").exists()
