"""The Ray executor: each job is a Ray job (the job submission API) whose entrypoint is the training command.

The entrypoint is the same `accelerate launch` command the local executor runs, started by Ray on a node
with the CPUs / GPUs the job reserves (`entrypoint_num_cpus` / `entrypoint_num_gpus`), so Ray queues it
until they are free ('PENDING'). Status, stop and logs go through Ray's `JobSubmissionClient`; the
training log is also written to the job directory, which every node must share (LLM_MCP_HOME).

A job with nodes > 1 runs `python -m llm_mcp.jobs.raynodes` as its entrypoint instead: one launcher per node
in a STRICT_SPREAD placement group, each running the same `accelerate launch` with its machine rank (see
there). Its entrypoint reserves nothing itself: the job shows RUNNING while the group waits for its nodes,
and train.log says so.

Settings: LLM_MCP_RAY_ADDRESS (the dashboard address, default http://127.0.0.1:8265),
LLM_MCP_CLUSTER_GPU_MEMORY_GB (memory of one GPU; Ray does not report it).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.hardware import GPU, Hardware
from llm_mcp.core.jobconfig import EvalConfig, JobConfig
from llm_mcp.jobs.cluster import ClusterExecutor, EngineJob, shell_join
from llm_mcp.jobs.local import accelerate_command, secret_environment

FREE_PORT = "$({python} -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])')"


class RayExecutor(ClusterExecutor):
    """Jobs as Ray jobs, through the job submission API of a running Ray cluster."""

    name = "ray"
    engine = "Ray"

    def __init__(self, store, settings):
        super().__init__(store, settings)
        self.address = settings.ray_address
        self._client = None
        self.alive_nodes = 1

    @property
    def client(self):
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient  # imported on first use: start-up stays light
            except ImportError:
                raise ConfigurationError(
                    "the ray executor needs Ray's job client: pip install 'llm-mcp[cluster]'"
                ) from None
            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as exc:  # requests' and Ray's errors alike mean "not reachable"
                raise ConfigurationError(
                    f"cannot reach the Ray cluster at LLM_MCP_RAY_ADDRESS={self.address!r} "
                    f"({exc}); start it (ray start --head) or point the setting at its "
                    "dashboard address"
                ) from None
        return self._client

    def describe_submission(self, job_id: str, cfg: JobConfig | EvalConfig, job_dir: Path) -> dict:
        hw = self.hardware()
        per_node = max(1, cfg.num_processes // cfg.nodes)
        gpus = per_node if cfg.device == "cuda" else 0
        cpus = per_node if gpus else hw.cpu_count  # a CPU job trains on the whole node, as on Slurm
        q, py = shlex.quote(str(job_dir)), shlex.quote(self.python)
        script = (
            f'if [ ! -f {q}/config.json ]; then echo "llm_mcp: job directory {job_dir} is not visible on '
            f'$(hostname): LLM_MCP_HOME must be on a filesystem shared by the server and every node" >&2; '
            f'exit 3; fi; cd {q} && echo "[ray] on $(hostname)" >> train.log && '
        )
        if cfg.nodes > 1:  # one launcher per node (llm_mcp.jobs.raynodes); the placement group reserves them
            script += f"exec {py} -m llm_mcp.jobs.raynodes {q} {cfg.nodes} {cpus} {gpus} 2>> train.log"
            reserve_cpus, reserve_gpus = 0, 0
        else:
            launch = accelerate_command(cfg, job_dir, python=self.python, port="$MAIN_PORT")
            script += (
                f"MAIN_PORT={FREE_PORT.format(python=py)} && {py} -m llm_mcp.jobs.fetch {q} >> train.log 2>&1 && "
                f"exec {shell_join(launch, raw=('$MAIN_PORT',))} >> train.log 2>&1"
            )
            reserve_cpus, reserve_gpus = cpus, gpus
        return {
            "kind": "ray job",
            "address": self.address,
            "submission_id": f"llm-mcp-{job_id}",
            "entrypoint": f"bash -c {shlex.quote(script)}",
            "entrypoint_num_cpus": reserve_cpus,
            "entrypoint_num_gpus": reserve_gpus,
            "runtime_env": {"env_vars": self.environment(cfg, cpus)},
            "metadata": {"llm_mcp_job": job_id},
        }

    def send(self, job_id: str, submission: dict) -> str:
        fields = {
            k: submission[k]
            for k in (
                "submission_id",
                "entrypoint",
                "entrypoint_num_cpus",
                "entrypoint_num_gpus",
                "runtime_env",
                "metadata",
            )
        }
        env = {**fields["runtime_env"]["env_vars"], **secret_environment()}  # the token only in what is sent
        fields["runtime_env"] = {**fields["runtime_env"], "env_vars": env}
        try:
            return self.client.submit_job(**fields)
        except Exception as exc:  # Ray raises RuntimeError, requests raises its own OSError kinds
            raise ConfigurationError(f"submitting to Ray at {self.address} failed: {exc}") from None

    def query(self, engine_ids: list[str]) -> dict[str, EngineJob]:
        found: dict[str, EngineJob] = {}
        for sid in engine_ids:
            try:
                info = self.client.get_job_info(sid)
            except Exception as exc:  # see send()
                if "does not exist" in str(exc):
                    continue
                raise ConfigurationError(f"reading Ray job {sid} at {self.address} failed: {exc}") from None
            status = str(getattr(info.status, "value", info.status))
            node = (info.driver_agent_http_address or "").split("//")[-1].split(":")[0]
            if status == "PENDING":
                found[sid] = EngineJob("pending", status, info.message or "", node)
            elif status == "RUNNING":
                found[sid] = EngineJob("running", status, "", node)
            else:
                outside = (
                    f"Ray stopped job {sid} outside this server (ray job stop, or its driver was lost)"
                    if status == "STOPPED"
                    else None
                )
                found[sid] = EngineJob("ended", status, info.message or "", node, info.driver_exit_code, outside)
        return found

    def find(self, job_id: str) -> str | None:
        sid = f"llm-mcp-{job_id}"
        return sid if self.query([sid]) else None

    def signal_stop(self, engine_id: str) -> None:
        pass  # the cancel file stops the trainer with a checkpoint; Ray's own stop kills after ~3 s (poll's grace)

    def kill(self, engine_id: str) -> None:
        try:
            self.client.stop_job(engine_id)
        except Exception as exc:  # see send()
            if "does not exist" not in str(exc):
                raise ConfigurationError(f"stopping Ray job {engine_id} failed: {exc}") from None

    def node_count(self) -> int:
        """Every alive node (read with the hardware): a job may land on any."""
        self.hardware()
        return self.alive_nodes

    def read_hardware(self) -> Hardware:
        """One of the alive nodes with the most GPUs (then CPUs); max_nodes: how many nodes have as many of both."""
        from ray.util.state import list_nodes

        try:
            nodes = [n for n in list_nodes(address=self.address, detail=True) if n.state == "ALIVE"]
        except Exception as exc:  # the state API raises many kinds; all mean "not reachable"
            raise ConfigurationError(
                f"cannot read the nodes of the Ray cluster at {self.address} ({exc}); is it running (ray status)?"
            ) from None
        if not nodes:
            raise ConfigurationError(f"the Ray cluster at {self.address} has no alive node")
        self.alive_nodes = len(nodes)
        best = max(nodes, key=lambda n: (n.resources_total.get("GPU", 0), n.resources_total.get("CPU", 0)))
        res = best.resources_total
        shape = (res.get("GPU", 0), res.get("CPU", 0))  # a multi-node job asks each node for this much
        alike = [n for n in nodes if (n.resources_total.get("GPU", 0), n.resources_total.get("CPU", 0)) == shape]
        kind = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "gpu")
        per_gpu = self.settings.cluster_gpu_memory_gb
        ram = round(min(n.resources_total.get("memory", 0) for n in alike) / 2**30, 1)
        return Hardware(
            gpus=[GPU(name=kind, memory_gb=per_gpu) for _ in range(int(res.get("GPU", 0)))],
            ram_gb=ram,
            available_ram_gb=ram,
            cpu_count=max(1, int(res.get("CPU", 1))),
            source=f"Ray cluster {self.address}",
            max_nodes=len(alike),
        )
