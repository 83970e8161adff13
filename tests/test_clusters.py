"""The Slurm and Ray executors against real single-node clusters, through the MCP tools.

Per engine: a 2-process LoRA job is cancelled, ends 'cancelled' with a checkpoint, and resumed finishes with
every step's loss as the same job run locally, and its adapter samples; a restarted server
(a new process) re-attaches to a running job; a job stopped from outside (scancel / ray job stop) ends
'failed' with that cause. Clusters start once per session (tests/clusters.py). Skip locally with -m "not cluster".
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from llm_mcp.core.settings import Settings, data_path
from tests.clusters import ARGS, cluster_app, losses, start_ray, start_slurm, started, stop_ray, stop_slurm, wait_step
from tests.conftest import server_env, wait_final

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.cluster]


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


async def test_a_job_runs_on_the_cluster_like_locally_and_cancel_resume_is_exact(
    engine, home, tiny_model, dataset, local_reference
):
    name, env = engine
    state, server = cluster_app(home, name, env)
    async with Client(server) as client:
        dry = await client.call_tool("start_finetune", {**ARGS, "dry_run": True})
        assert dry.structured_content["submission"]["kind"] == ("sbatch" if name == "slurm" else "ray job")
        stopped = await started(client, **ARGS)
        await wait_step(client, state, stopped, 3)
        result = await client.call_tool("cancel_job", {"job_id": stopped})
        assert not result.is_error, result.content[0].text
        job = await wait_final(client, stopped, timeout=300)
        assert job["state"] == "cancelled" and job["checkpoints"], job
        assert job["engine"] == name and job["engine_job_id"] and job["nodes"], job
        at = job["checkpoints"][-1]["step"]
        resumed = await started(client, **ARGS, resume_from=stopped)
        job = await wait_final(client, resumed, timeout=300)
        assert job["state"] == "succeeded", job
        sample = await client.call_tool("sample", {"job_id": resumed, "prompt": "The cat", "max_tokens": 6})
        assert not sample.is_error and sample.structured_content["completions"][0]["completion_tokens"] > 0
    state.shutdown()
    assert 3 <= at < 120
    before, after = losses(state, stopped), losses(state, resumed)
    assert sorted(after) == list(range(at + 1, 121)) and set(before) >= set(range(1, at + 1))
    # every step as the local executor ran it: before the cancel, and the resumed run continuing exactly
    for step, loss in [*before.items(), *after.items()]:
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
