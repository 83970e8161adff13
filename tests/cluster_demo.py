"""The cluster walk-through of docs/operations.md: a job across two nodes through Slurm and one through Ray.

    sudo .venv/bin/python -m tests.cluster_demo     # needs slurm-wlm + munge (make cluster-engines) and ray

Starts the same private three-node clusters the multi-node tests use (tests/multinode.py: each node a
network namespace), runs a LoRA job with nodes=2 on each through the MCP tools of an in-process server,
prints what the tools answer, then the Slurm dry run of that job.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import anyio
from mcp import Client

from llm_mcp.core.settings import Settings, data_path
from llm_mcp.tiny import make_tiny_model
from tests.clusters import stop_ray, stop_slurm
from tests.conftest import LEARNABLE_ROWS
from tests.multinode import IFNAME, make_net, remove_net, start_ray_nodes, start_slurm_nodes

JOB = dict(
    model="models/tiny",
    method="lora",
    dataset="data/train.jsonl",
    max_steps=30,
    num_processes=2,
    nodes=2,
    batch_size=4,
    max_seq_len=64,
    learning_rate=5e-3,
)


async def run(home: Path, settings: Settings, dry_run: bool = False) -> None:
    from llm_mcp.server import AppState, build_server

    state = AppState.load(settings)
    async with Client(build_server(state)) as client:
        if dry_run:
            dry = await client.call_tool("start_finetune", {**JOB, "dry_run": True})
            print(dry.content[0].text)
            return
        started = await client.call_tool("start_finetune", JOB)
        job_id = started.structured_content["job_id"]
        print(f"> start_finetune(...) -> {job_id}")
        while True:
            status = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 30})
            if status.structured_content["job"]["state"] in ("succeeded", "failed", "cancelled"):
                break
        print(f"> job_status(job_id='{job_id}')\n{status.content[0].text}")
        sample = await client.call_tool("sample", {"job_id": job_id, "prompt": "The cat", "max_tokens": 8})
        print(f"> sample(job_id='{job_id}', prompt='The cat')\n{sample.content[0].text}\n")
    state.shutdown()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="llm-mcp-cluster-demo-"))
    home = root / "home"
    make_tiny_model(home / "models" / "tiny")
    (home / "data").mkdir()
    (home / "data" / "train.jsonl").write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(64)))
    base = dict(home=home, models_path=data_path("models.yaml"), sampler="transformers", cluster_ifname=IFNAME)
    slurm_net, ray_net = make_net(3, index=0), make_net(3, index=1)
    ray_root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    slurm_env: dict[str, str] = {}
    try:
        slurm_env = start_slurm_nodes(root / "slurm", slurm_net)
        os.environ.update(slurm_env)
        print("=== Slurm, 3 nodes (llm-mcp serve --executor slurm) ===")
        anyio.run(run, home, Settings(**base, executor="slurm"))
        print("=== Ray, 3 nodes (llm-mcp serve --executor ray) ===")
        address = start_ray_nodes(ray_root, ray_net)
        anyio.run(run, home, Settings(**base, executor="ray", ray_address=address))
        print("=== Slurm: start_finetune(..., nodes=2, dry_run=true) ===")
        anyio.run(run, home, Settings(**base, executor="slurm"), True)
    finally:
        stop_ray(ray_root)
        stop_slurm(root / "slurm", slurm_env)
        remove_net(slurm_net)
        remove_net(ray_net)


if __name__ == "__main__":
    main()
