"""A Ray job over several nodes: one launcher per node in a placement group, each running `accelerate launch`.

The Ray executor submits `python -m llm_mcp.jobs.raynodes JOB_DIR NODES CPUS GPUS` as the job's entrypoint
for a job with nodes > 1. It reserves one bundle of CPUS / GPUS per node with STRICT_SPREAD (every bundle on
a different node; Ray holds the job until that many nodes are free), starts one launcher actor in each bundle,
fetches the model on every node (all done before any launches, as on Slurm), then runs the same command the
Slurm executor runs on each node: `accelerate launch --num_machines NODES --machine_rank i --main_process_ip
<bundle 0's node>`. The training loop is ours on every engine, so losses, checkpoints and resume are the same;
Ray Train would bring a second loop.

When one node's launcher ends badly (its trainer failed, or the node was lost and Ray reports the actor
dead), the others are stopped (SIGTERM, then SIGKILL) and the job exits 1; the cause is decided from the
ranks' records (llm_mcp.jobs.outcome). Each launcher starts its command in a new session that gets SIGTERM
when the launcher dies, and stopping a launcher ends the command's whole process tree.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.exceptions import RayError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.jobdir import cancel_requested
from llm_mcp.core.procs import end_tree
from llm_mcp.jobs.local import accelerate_command

STOP_GRACE_S = 15.0  # a launcher's command gets this long after SIGTERM before SIGKILL
WAIT_LOG_S = 60  # while the placement group waits for free nodes, the log says so this often


_LIBC: ctypes.CDLL | None
try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here: the forked child must not dlopen
except OSError:  # not glibc Linux: no parent-death signal, the launcher's stop() still ends the tree
    _LIBC = None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher that started it dies (Linux's PR_SET_PDEATHSIG)."""
    parent = os.getppid()
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)


@ray.remote(max_concurrency=2)  # run() blocks in one thread; stop() must still get through
class NodeLauncher:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def where(self) -> tuple[str, int]:
        """This node's address and a free port on it (the rendezvous, when this is node 0)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def run(self, cmd: list[str], log: str) -> int:
        env = {**os.environ, "LLM_MCP_NODE": ray.util.get_node_ip_address()}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(log).parent,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self.proc.wait()

    def stop(self) -> None:
        """SIGTERM to the command and every process under it (torchrun starts its workers in sessions of their
        own), SIGKILL to whatever is left after STOP_GRACE_S."""
        if self.proc is None or self.proc.poll() is not None:
            return
        end_tree(self.proc.pid, STOP_GRACE_S)


def say(log: Path, line: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"[ray] {line}\n")


def run_everywhere(launchers: list, commands: list[list[str]], addrs: list[str], log: Path) -> str | None:
    """Run one command per launcher; None when all exit 0, else what went wrong first (the rest are stopped)."""
    pending = {launcher.run.remote(cmd, str(log)): i for i, (launcher, cmd) in enumerate(zip(launchers, commands))}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        try:
            code = ray.get(done[0])
            problem = None if code == 0 else f"node {addrs[i]} (machine rank {i}) exited with code {code}"
        except RayError as exc:
            problem = f"node {addrs[i]} (machine rank {i}) was lost: {type(exc).__name__}"
        if problem:
            say(log, problem + "; stopping the other nodes")
            stops = [launchers[j].stop.remote() for j in pending.values()]
            ray.wait(stops, num_returns=len(stops), timeout=STOP_GRACE_S + 10)
            return problem
    return None


def main(argv: list[str]) -> int:
    job_dir, nodes, cpus, gpus = Path(argv[0]), int(argv[1]), float(argv[2]), float(argv[3])
    log = job_dir / "train.log"
    cfg = JobConfig.read(job_dir)
    ray.init()
    say(log, f"waiting for {nodes} nodes with {cpus:g} CPUs and {gpus:g} GPUs each (a STRICT_SPREAD placement group)")
    group = placement_group([{"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}] * nodes, strategy="STRICT_SPREAD")
    t0 = time.time()
    next_note = t0 + WAIT_LOG_S
    while not group.wait(timeout_seconds=5):  # as long as the cluster needs, like a queued Slurm job
        if cancel_requested(job_dir):
            say(log, "cancelled while waiting for nodes")
            return 0
        if time.time() >= next_note:
            next_note += WAIT_LOG_S
            say(log, f"still waiting for {nodes} free nodes after {time.time() - t0:.0f} s")
    launchers = [
        NodeLauncher.options(  # type: ignore[attr-defined]
            num_cpus=cpus,
            num_gpus=gpus,  # Ray sets the actor's CUDA_VISIBLE_DEVICES, which its trainers inherit
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote()
        for i in range(nodes)
    ]
    addrs = [ip for ip, _ in ray.get([launcher.where.remote() for launcher in launchers])]
    say(log, f"nodes {', '.join(addrs)} (machine ranks 0..{nodes - 1})")
    fetch = [sys.executable, "-m", "llm_mcp.jobs.fetch", str(job_dir)]
    problem = run_everywhere(launchers, [fetch] * nodes, addrs, log)
    if problem is None:
        main_ip, port = ray.get(launchers[0].where.remote())  # a port free now, not before a long fetch
        say(log, f"rendezvous {main_ip}:{port}")
        commands = [
            accelerate_command(cfg, job_dir, python=sys.executable, port=port, machine_rank=str(i), main_ip=main_ip)
            for i in range(nodes)
        ]
        t0 = time.time()
        problem = run_everywhere(launchers, commands, addrs, log)
        if problem is None:
            say(log, f"all nodes done in {time.time() - t0:.0f} s")
    return 0 if problem is None else 1


if __name__ == "__main__":
    # Run from the module under its real name: Ray then sends the launcher class to the nodes by reference (they
    # import llm_mcp.jobs.raynodes) rather than pickling __main__'s copy by value, with its ctypes handle.
    from llm_mcp.jobs import raynodes

    sys.exit(raynodes.main(sys.argv[1:]))
