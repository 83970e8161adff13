"""Jobs across two nodes on real multi-node clusters built on this machine (tests/multinode.py): Slurm with
three slurmd, and Ray with a head and two workers, every node in its own network namespace.

Per engine, one 2-node LoRA job through the MCP tools: its two ranks run on two nodes and talk over the
bridge, and job_status names both; after its first checkpoint one node is killed (its daemons and its
trainer, kill -9); the job ends 'failed' naming that node, the step and the last checkpoint, with no process
of it left on any node; resumed with nodes=2 it finishes on the healthy nodes. Every step's loss, before the
kill and after the resume, equals the same global batch run as two processes on one machine (rel 1e-4).
Skip locally with -m "not cluster".
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
from mcp import Client

from llm_mcp.core.jobdir import checkpoints
from tests.clusters import ARGS, _wait, cluster_app, losses, started, stop_ray, stop_slurm
from tests.conftest import processes_mentioning, wait_final
from tests.multinode import (
    IFNAME,
    make_net,
    ray_node_alive,
    remove_net,
    slurm_node_state,
    start_ray_nodes,
    start_slurm_nodes,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.cluster]
NODE_ARGS = {**ARGS, "nodes": 2, "num_processes": 2, "checkpoint_every": 20}


@pytest.fixture(scope="module")
def slurm_nodes(tmp_path_factory):
    net = make_net(3, index=0)
    root = tmp_path_factory.mktemp("slurm-nodes")
    env: dict[str, str] = {}
    try:
        env = start_slurm_nodes(root, net)
        yield net, env
    finally:
        stop_slurm(root, env)
        remove_net(net)


@pytest.fixture(scope="module")
def ray_nodes():
    net = make_net(3, index=1)
    root = Path(tempfile.mkdtemp(prefix="raynodes-", dir="/tmp"))  # Ray's socket paths stay under 107 characters
    try:
        yield net, start_ray_nodes(root, net)
    finally:
        stop_ray(root)
        remove_net(net)


@pytest.fixture(params=["slurm", "ray"])
def nodes_engine(request, monkeypatch):
    """(engine, its network, the environment a server needs, node name -> namespace index, node-is-down check)."""
    if request.param == "slurm":
        net, env = request.getfixturevalue("slurm_nodes")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        index = {f"lmn{i + 1}": i for i in range(len(net.names))}
        return (
            "slurm",
            net,
            dict(env),
            index,
            lambda node: "down" in slurm_node_state(env, node) or "*" in (slurm_node_state(env, node)),
        )
    net, address = request.getfixturevalue("ray_nodes")
    index = {net.addr(i): i for i in range(len(net.names))}
    return "ray", net, {"LLM_MCP_RAY_ADDRESS": address}, index, lambda node: not ray_node_alive(address, node)


async def test_a_two_node_job_matches_one_node_and_a_lost_node_fails_it_then_resume_finishes(
    nodes_engine, home, tiny_model, dataset, local_reference
):
    name, net, env, index, node_down = nodes_engine
    state, server = cluster_app(home, name, {**env, "LLM_MCP_CLUSTER_IFNAME": IFNAME})
    async with Client(server) as client:
        listing = await client.call_tool("list_models", {"model": "models/tiny"})
        assert listing.structured_content["hardware"]["nodes"] == 3, listing.content[0].text
        too_many = await client.call_tool("start_finetune", {**NODE_ARGS, "nodes": 4, "num_processes": 4})
        assert too_many.is_error and "nodes=4" in too_many.content[0].text and "nodes<=3" in too_many.content[0].text
        job_id = await started(client, **NODE_ARGS)
        job_dir = state.store.job_dir(job_id)
        first = job_dir / "checkpoints" / "step-000020"
        _wait(lambda: first.is_dir() or state.store.get(job_id).state == "failed", 240, f"job {job_id} checkpointing")
        assert first.is_dir(), (job_dir / "train.log").read_text()[-3000:]
        for _ in range(30):  # the server's watcher reads the engine's state every few seconds
            status = (await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 1})).structured_content[
                "job"
            ]
            if status["state"] == "running":
                break
        assert status["state"] == "running", status
        ranks = {r["rank"]: r for r in status["ranks"]}
        assert sorted(ranks) == [0, 1] and {r["node_rank"] for r in ranks.values()} == {0, 1}, status
        assert ranks[0]["node"] != ranks[1]["node"] and {ranks[0]["node"], ranks[1]["node"]} <= set(index), status
        log = (job_dir / "train.log").read_text()
        for r in ranks.values():
            assert f"[rank {r['rank']}/2] node {r['node']} (node rank {r['node_rank']})" in log, log[-3000:]

        # Lose a node (on Ray, not the head: Ray itself does not survive losing its head node).
        victim = ranks[1]["node"] if name == "slurm" or index[ranks[1]["node"]] else ranks[0]["node"]
        killed = net.kill_node(index[victim])
        assert any("slurmd" in c or "raylet" in c for c in killed) and any("llm_mcp.train.run" in c for c in killed)
        t0 = time.monotonic()
        job = await wait_final(client, job_id, timeout=180)
        took = time.monotonic() - t0
        assert job["state"] == "failed", job
        assert f"on node {victim} ended without a word during step" in job["error"], job
        at = checkpoints(job_dir)[-1][0]
        assert f"the last checkpoint is step {at}" in job["error"], job
        assert f"resume_from='{job_id}'" in job["next_step"], job
        assert any(r["node"] == victim and r["state"] == "lost" for r in job["ranks"]), job
        assert took < 90, f"the lost node was noticed after {took:.0f} s"
        _wait(lambda: not processes_mentioning(str(job_dir)), 60, "the job's processes ending on every node")
        _wait(lambda: node_down(victim), 60, f"{name} marking node {victim} down")

        resumed = await started(client, **NODE_ARGS, resume_from=job_id)
        done = await wait_final(client, resumed, timeout=300)
        assert done["state"] == "succeeded", done
        assert victim not in {r["node"] for r in done["ranks"]} and len({r["node"] for r in done["ranks"]}) == 2, done
    state.shutdown()
    before, after = losses(state, job_id), losses(state, resumed)
    assert at >= 20 and sorted(after) == list(range(at + 1, 121)), (at, sorted(after)[:3])
    for step, loss in [*before.items(), *after.items()]:
        assert loss == pytest.approx(local_reference[step], rel=1e-4, abs=1e-5), step
