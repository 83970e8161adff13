"""Real multi-node clusters on this machine: each node is a network namespace with its own address on a bridge.

`make_net(3)` creates a bridge with address A.1 and three namespaces, each with one interface `llm0` at A.2,
A.3, A.4 (A = 10.213.K, K from this process id, so two sessions rarely collide). Only addresses inside those
namespaces are ever contacted. A process started in a namespace (and everything it starts) can reach the
other nodes only over the bridge, as a real node reaches others over its network; the filesystem is shared,
as a cluster's shared filesystem is. `remove_net` kills what is left in the namespaces and deletes them.

Slurm: one slurmctld in the host's namespace on the bridge address, one slurmd per namespace under its own
node name (slurmd -N), one munged whose socket every node reaches through the shared filesystem.
Ray: the head in the first namespace, a worker in each other one (`ray start --address`), each with its
own temporary directory, as separate machines have.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from llm_mcp.core.procs import usable_cores
from tests.clusters import _missing, _wait, slurm_conf, start_munge

IFNAME = "llm0"  # the nodes' interface: LLM_MCP_CLUSTER_IFNAME names it to gloo / NCCL


@dataclass
class Net:
    prefix: str  # the first three octets of the nodes' addresses
    bridge: str
    names: list[str]  # the namespaces, one per node

    @property
    def host_addr(self) -> str:
        return f"{self.prefix}.1"

    def addr(self, i: int) -> str:
        return f"{self.prefix}.{i + 2}"

    def run_in(self, i: int, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.names[i]}", *args], **kw)

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_node(self, i: int) -> list[str]:
        """kill -9 every process in node i (its daemons and the job's processes there); their command lines."""
        killed = []
        for pid in self.pids(i):
            try:
                proc = psutil.Process(pid)
                killed.append(" ".join(proc.cmdline()))
                proc.kill()
            except psutil.Error:
                pass
        return killed


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_net(nodes: int, index: int = 0) -> Net:
    """`nodes` namespaces on a new bridge; `index` tells apart the networks of one session (0 to 1)."""
    if shutil.which("ip") is None:
        _missing("`ip` is not installed (apt-get install iproute2)")
    if os.geteuid() != 0:
        _missing("the multi-node test clusters create network namespaces as root")
    k = 20 + 2 * (os.getpid() % 100) + index
    net = Net(prefix=f"10.213.{k}", bridge=f"lmbr{k}", names=[f"llmmcp-{k}-n{i + 1}" for i in range(nodes)])
    remove_net(net)  # what a killed earlier session with this number left
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
    except subprocess.CalledProcessError as exc:
        _missing(f"cannot create a network bridge here ({exc.stderr.decode().strip()})")
    _ip("addr", "add", f"{net.host_addr}/24", "dev", net.bridge)
    _ip("link", "set", net.bridge, "up")
    for i, name in enumerate(net.names):
        veth = f"lmv{k}n{i + 1}"
        _ip("netns", "add", name)
        _ip("link", "add", veth, "type", "veth", "peer", "name", IFNAME, "netns", name)
        _ip("link", "set", veth, "master", net.bridge, "up")
        _ip("-n", name, "addr", "add", f"{net.addr(i)}/24", "dev", IFNAME)
        _ip("-n", name, "link", "set", IFNAME, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    return net


def remove_net(net: Net) -> None:
    """Kill whatever still runs in the namespaces, then delete them and the bridge (their interfaces go with them)."""
    for i, name in enumerate(net.names):
        if Path(f"/run/netns/{name}").exists():
            net.kill_node(i)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)


def start_slurm_nodes(root: Path, net: Net) -> dict[str, str]:
    """slurmctld on the bridge address and one slurmd per namespace (nodes lmn1, lmn2, ... in partition `nodes`)."""
    sock = start_munge(root)
    host = socket.gethostname().split(".")[0]
    cpus = usable_cores()
    ram_mb = int(psutil.virtual_memory().total / 2**20 / len(net.names)) - 512
    nodes = "\n".join(
        f"NodeName=lmn{i + 1} NodeAddr={net.addr(i)} CPUs={cpus} RealMemory={ram_mb} State=UNKNOWN"
        for i in range(len(net.names))
    )
    conf = root / "slurm.conf"
    nodes += "\nPartitionName=nodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
    # a node whose slurmd stops answering is marked down after 10 s (Slurm's default is 300 s)
    controller = f"{host}({net.host_addr})"
    conf.write_text(slurm_conf("llmmcpnodes", root, sock, controller, 6818, nodes, "SlurmdTimeout=10\nKillWait=10"))
    (root / "state").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    for i in range(len(net.names)):
        (root / f"spool-lmn{i + 1}").mkdir()
        net.run_in(i, ["slurmd", "-f", str(conf), "-N", f"lmn{i + 1}"], check=True, env=env)

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env)
        return out.returncode == 0 and out.stdout.split() == ["idle"] * len(net.names)

    _wait(idle, 60, f"the Slurm nodes did not become idle (logs in {root})")
    return {"SLURM_CONF": str(conf)}


def slurm_node_state(env: dict[str, str], node: str) -> str:
    out = subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True, env={**os.environ, **env}
    )
    return out.stdout.strip()


def start_ray_nodes(root: Path, net: Net) -> str:
    """A Ray head in node 0 and a worker in every other node; returns the dashboard (job API) address."""
    ray = str(Path(sys.executable).parent / "ray")
    try:
        import aiohttp  # noqa: F401 - ray[default]: the dashboard and job API
        import ray as _  # noqa: F401
    except ImportError:
        _missing("ray[default] is not installed (pip install -e '.[cluster]')")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cpus = str(usable_cores())
    head = net.addr(0)
    # a lost node is declared dead after ~3 s of missed health checks (Ray's default is ~30 s)
    system = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'
    common = ["--num-cpus", cpus, "--num-gpus=0", "--disable-usage-stats"]
    net.run_in(
        0,
        [ray, "start", "--head", f"--node-ip-address={head}", "--port=6379", "--dashboard-port=8265",
         "--dashboard-host=0.0.0.0", "--include-dashboard=true", f"--temp-dir={root}/n1",
         f"--system-config={system}", *common],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    for i in range(1, len(net.names)):
        net.run_in(
            i,
            [ray, "start", f"--address={head}:6379", f"--node-ip-address={net.addr(i)}",
             f"--temp-dir={root}/n{i + 1}", *common],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
    address = f"http://{head}:8265"

    def all_up() -> bool:
        try:
            from ray.util.state import list_nodes

            return len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) == len(net.names)
        except Exception:  # not up yet
            return False

    _wait(all_up, 120, f"the Ray nodes did not all join (logs in {root})")
    return address


def ray_node_alive(address: str, ip: str) -> bool:
    from ray.util.state import list_nodes

    return any(n.node_ip == ip and n.state == "ALIVE" for n in list_nodes(address=address))
