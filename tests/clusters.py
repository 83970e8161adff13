"""Real single-node clusters for the executor tests: Slurm (munged + slurmctld + slurmd) and Ray (ray start
--head); and what the cluster tests share (their job, its reference losses, a server on an engine).

Both run from a private directory with their own ports, so they neither need nor touch a system-wide
configuration, and both are stopped at the end of the session. A cluster whose programs are missing is
skipped, unless LLM_MCP_REQUIRE_CLUSTERS=1 (set by `make test` after installing them) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llm_mcp.core.jobdir import read_metrics
from llm_mcp.core.procs import free_port, usable_cores
from llm_mcp.core.settings import Settings, data_path

# The job every cluster test runs (and tests/conftest.py's local_reference, the losses they must reproduce).
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


def _missing(what: str) -> None:
    if os.environ.get("LLM_MCP_REQUIRE_CLUSTERS") == "1":
        pytest.fail(f"{what} (LLM_MCP_REQUIRE_CLUSTERS=1)")
    pytest.skip(what)


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} within {timeout:g} s")


def start_munge(root: Path) -> Path:
    """munged with a fresh key under root/munge; returns its socket (every node of a test cluster uses it).
    Skips (or fails, see _missing) where Slurm is not installed or we are not root."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _missing("the test Slurm cluster runs its daemons as root")
    root.mkdir(parents=True, exist_ok=True)
    munge = root / "munge"
    munge.mkdir(mode=0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = munge / "munge.socket"
    subprocess.run(
        [
            "munged",
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--log-file={munge / 'log'}",
            f"--pid-file={munge / 'pid'}",
            f"--seed-file={munge / 'seed'}",
        ],
        check=True,
    )
    return sock


def slurm_conf(name: str, root: Path, sock: Path, controller: str, slurmd_port: int, nodes: str, timing: str) -> str:
    """A private cluster's slurm.conf: its controller (`host(address)`), node and partition lines, and timeouts.
    Per-node files are named with %n (the node's name), so several slurmd can share `root`."""
    return f"""ClusterName={name}
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={sock}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=300
{timing}
{nodes}"""


def start_slurm(root: Path) -> dict[str, str]:
    """A one-node Slurm cluster as root; returns the environment its clients need (SLURM_CONF).

    Partition `debug` (the default) is that node; partition `multi` adds a node that never starts, so a
    two-node job there is accepted and stays pending (the multi-node dry run and queue-state tests).
    """
    sock = start_munge(root)
    host = socket.gethostname().split(".")[0]
    ram_mb = int(psutil.virtual_memory().total / 2**20) - 1024
    conf = root / "slurm.conf"
    nodes = f"""NodeName={host} NodeAddr=127.0.0.1 CPUs={usable_cores()} RealMemory={ram_mb} State=UNKNOWN
NodeName=ghost NodeAddr=203.0.113.1 CPUs={usable_cores()} RealMemory={ram_mb} State=DOWN Reason="never started"
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes={host},ghost Default=NO MaxTime=INFINITE State=UP
"""
    conf.write_text(slurm_conf("llmmcptest", root, sock, f"{host}(127.0.0.1)", free_port(), nodes, "KillWait=30"))
    (root / "state").mkdir()
    (root / f"spool-{host}").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf), "-N", host], check=True, env=env)

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True, env=env)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    _wait(idle, 60, f"the Slurm node did not become idle (logs in {root})")
    return {"SLURM_CONF": str(conf)}


def stop_slurm(root: Path, env: dict[str, str]) -> None:
    subprocess.run(["scancel", "--user=root"], env={**os.environ, **env}, capture_output=True)
    for pid_file in [root / "slurmctld.pid", root / "munge" / "pid", *root.glob("slurmd-*.pid")]:
        try:
            os.kill(int(pid_file.read_text().strip()), 15)
        except (OSError, ValueError):
            pass
    stop_ray(root)  # and anything else still started from this directory (daemons whose pid file was lost)


def start_ray(root: Path) -> str:
    """A one-node Ray cluster with the job submission API; returns its dashboard address."""
    ray = Path(sys.executable).parent / "ray"
    try:
        import aiohttp  # noqa: F401 - ray[default]: the dashboard and job API
        import ray as _  # noqa: F401
    except ImportError:
        _missing("ray[default] is not installed (pip install -e '.[cluster]')")
    port, dash = free_port(), free_port()
    subprocess.run(
        [
            str(ray),
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={usable_cores()}",
            "--num-gpus=0",
            f"--temp-dir={root}",
            "--disable-usage-stats",
            "--include-dashboard=true",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    address = f"http://127.0.0.1:{dash}"

    def up() -> bool:
        try:
            from ray.job_submission import JobSubmissionClient

            JobSubmissionClient(address).list_jobs()
            return True
        except Exception:  # not up yet
            return False

    _wait(up, 90, "the Ray job API did not answer")
    return address


def stop_ray(root: Path) -> None:
    """Stop this cluster only (not others the developer may run): its processes mention `root`, and their children
    (Ray's agents retitle themselves 'ray::DashboardAgent', so their command lines no longer do)."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if str(root) in " ".join(p.info.get("cmdline") or [])]
    for p in list(procs):
        try:
            procs += p.children(recursive=True)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def cluster_app(home, name: str, env: dict[str, str]):
    from llm_mcp.server import AppState, build_server

    settings = Settings(
        home=home,
        models_path=data_path("models.yaml"),
        sampler="transformers",
        executor=name,
        ray_address=env.get("LLM_MCP_RAY_ADDRESS", "http://127.0.0.1:8265"),
        cluster_ifname=env.get("LLM_MCP_CLUSTER_IFNAME"),
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
