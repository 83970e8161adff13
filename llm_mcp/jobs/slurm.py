"""The Slurm executor: each job is a batch script (sbatch) that runs `accelerate launch` under srun.

One srun task per node; each task runs `accelerate launch` with its own `--machine_rank $SLURM_NODEID`
and the first node of the allocation as the rendezvous address (its NodeAddr: the address Slurm itself
reaches it at). Both are expanded by the shell *on each node* (the command is single-quoted into `bash -c`),
never on the submitting host: expanding them there gives every node rank 0 (accelerate#2816).
State comes from squeue / scontrol, which know a job until MinJobAge (300 s by default) after it ends, so no
accounting database (sacct) is needed; a job Slurm has forgotten is decided by its result file.

Settings (environment; a request's `scheduler` overrides the first five):
  LLM_MCP_SLURM_PARTITION, LLM_MCP_SLURM_ACCOUNT, LLM_MCP_SLURM_QOS, LLM_MCP_SLURM_TIME (e.g. 04:00:00),
  LLM_MCP_SLURM_CONSTRAINT, LLM_MCP_SLURM_ARGS (extra sbatch options, operator-only),
  LLM_MCP_CLUSTER_GPU_MEMORY_GB (memory of one of the partition's GPUs; Slurm does not report it).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.hardware import GPU, Hardware
from llm_mcp.core.jobconfig import EvalConfig, JobConfig
from llm_mcp.jobs.cluster import ClusterExecutor, EngineJob, shell_join
from llm_mcp.jobs.local import accelerate_command

CALL_TIMEOUT_S = 15
PENDING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD")
RUNNING = ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING")
# Ends the engine caused, with the words job_status shows (COMPLETED / FAILED: the job's own processes ended).
OUTSIDE = {
    "CANCELLED": "Slurm cancelled job {id} outside this server (scancel or an administrator)",
    "TIMEOUT": "Slurm stopped job {id} at its time limit (TIMEOUT); give a longer scheduler.time_limit",
    "PREEMPTED": "Slurm preempted job {id} for a higher-priority job (PREEMPTED)",
    "NODE_FAIL": "a node of Slurm job {id} failed (NODE_FAIL)",
    "BOOT_FAIL": "a node of Slurm job {id} failed to boot (BOOT_FAIL)",
    "OUT_OF_MEMORY": "Slurm killed job {id} for using more memory than it was given (OUT_OF_MEMORY)",
    "DEADLINE": "Slurm ended job {id} at its deadline (DEADLINE)",
}
SCHEDULER_FIELDS = {
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "time_limit": "--time",
    "constraint": "--constraint",
}


def _run(args: list[str], what: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    except FileNotFoundError:
        raise ConfigurationError(
            f"`{args[0]}` is not installed on the server's machine; the slurm executor needs "
            "the Slurm client commands (and munge) configured for the cluster"
        ) from None
    except subprocess.TimeoutExpired:
        raise ConfigurationError(
            f"{what}: `{args[0]}` did not answer within {CALL_TIMEOUT_S} s; is slurmctld up?"
        ) from None
    if out.returncode != 0:
        raise ConfigurationError(f"{what}: `{shlex.join(args)}` failed: {(out.stderr or out.stdout).strip()[:500]}")
    return out.stdout


class SlurmExecutor(ClusterExecutor):
    """Jobs as Slurm batch jobs (sbatch), watched with squeue / scontrol, cancelled with scancel."""

    name = "slurm"
    engine = "Slurm"

    def options(self, cfg: JobConfig | EvalConfig) -> dict[str, str]:
        """The scheduler options for a job: the server's settings, then the request's."""
        opts = {k: v for k, v in self.settings.slurm.items() if k in SCHEDULER_FIELDS and v}
        requested = getattr(cfg, "scheduler", None)
        if requested is not None:
            opts.update({k: v for k, v in requested.model_dump().items() if v})
        return opts

    def describe_submission(self, job_id: str, cfg: JobConfig | EvalConfig, job_dir: Path) -> dict:
        hw = self.hardware()
        per_node = max(1, cfg.num_processes // cfg.nodes)
        node_gpus = len(hw.gpus)
        cpus = hw.cpu_count if not node_gpus else max(1, per_node * (hw.cpu_count // node_gpus))
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name=llm-mcp-{job_id}",
            f"#SBATCH --nodes={cfg.nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --cpus-per-task={cpus}",
        ]
        if cfg.device == "cuda":
            lines.append(f"#SBATCH --gres=gpu:{per_node}")
        else:
            lines.append("#SBATCH --mem=0")  # a CPU job trains in host RAM; the fit check planned on all of it
        for key, value in self.options(cfg).items():
            lines.append(f"#SBATCH {SCHEDULER_FIELDS[key]}={value}")
        lines += [
            f"#SBATCH --output={job_dir}/slurm-%j.out",
            "#SBATCH --open-mode=append",
            f"#SBATCH --chdir={job_dir}",
            "#SBATCH --no-requeue",
            "",
        ]
        env = self.environment(cfg, cpus)
        launch = accelerate_command(
            cfg, job_dir, python=self.python, port="$MAIN_PORT", machine_rank="$SLURM_NODEID", main_ip="$MAIN_ADDR"
        )
        task = (
            'export LLM_MCP_NODE="$SLURMD_NODENAME"; echo "[slurm] node $SLURMD_NODENAME: machine rank '
            '$SLURM_NODEID of $SLURM_NNODES"; exec '
            + shell_join(launch, raw=("$MAIN_PORT", "$SLURM_NODEID", "$MAIN_ADDR"))
        )
        q = shlex.quote(str(job_dir))
        lines += [
            "set -uo pipefail",
            f"if [ ! -f {q}/config.json ]; then",
            f'  echo "llm_mcp: job directory {job_dir} is not visible on $(hostname): LLM_MCP_HOME must be on a '
            'filesystem shared by the server and every node" >&2',
            "  exit 3",
            "fi",
            *[f"export {k}={shlex.quote(v)}" for k, v in env.items()],
            'MAIN_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            "# the first node's address as Slurm itself reaches it (NodeAddr), else its name",
            'MAIN_ADDR="$(scontrol show node -o "$MAIN_NODE" | grep -o \'NodeAddr=[^ ]*\' | cut -d= -f2)"',
            'export MAIN_ADDR="${MAIN_ADDR:-$MAIN_NODE}"',
            "export MAIN_PORT=$(( 10000 + SLURM_JOB_ID % 20000 ))  # below Linux's ephemeral ports",
            'echo "[slurm] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (rendezvous $MAIN_ADDR:$MAIN_PORT)" >> '
            f"{q}/train.log",
            "# the model into each node's cache first, all nodes done before any launches (llm_mcp.jobs.fetch)",
            f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 {shlex.quote(self.python)} -m llm_mcp.jobs.fetch {q} "
            f">> {q}/train.log 2>&1 || exit 1",
            "# single quotes: $SLURM_NODEID and $MAIN_ADDR expand in each node's task, not here",
            f'srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" '
            f"bash -c {shlex.quote(task)} >> {q}/train.log 2>&1",
        ]
        path = job_dir / "submit.sbatch"
        extra = shlex.split(self.settings.slurm.get("sbatch_args", ""))  # the operator's, on the command line
        return {
            "kind": "sbatch",
            "command": ["sbatch", "--parsable", *extra, str(path)],
            "path": str(path),
            "script": "\n".join(lines) + "\n",
        }

    def send(self, job_id: str, submission: dict) -> str:
        Path(submission["path"]).write_text(submission["script"])
        out = _run(submission["command"], "submitting the job").strip()
        return out.split(";")[0]

    def query(self, engine_ids: list[str]) -> dict[str, EngineJob]:
        try:
            out = _run(
                ["squeue", "--states=all", "-h", "-j", ",".join(engine_ids), "-o", "%i|%T|%r|%N"], "reading job states"
            )
        except ConfigurationError as exc:
            if "Invalid job id" in str(exc):
                return {}  # none of them is known any more
            raise
        found: dict[str, EngineJob] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) != 4 or parts[0] not in engine_ids:
                continue
            sid, state, reason, nodes = parts
            state = state.split()[0].rstrip("+")
            if state in PENDING:
                found[sid] = EngineJob("pending", state, reason, nodes)
            elif state in RUNNING:
                found[sid] = EngineJob("running", state, "", nodes)
            else:
                outside = OUTSIDE[state].format(id=sid) if state in OUTSIDE else None
                found[sid] = EngineJob("ended", state, reason, nodes, self._exit_code(sid), outside)
        return found

    def _exit_code(self, engine_id: str) -> int | None:
        try:
            out = _run(["scontrol", "show", "job", "-o", engine_id], "reading an exit code")
        except ConfigurationError:
            return None
        m = re.search(r"\bExitCode=(\d+):(\d+)", out)
        if not m:
            return None
        code, sig = int(m.group(1)), int(m.group(2))
        return -sig if sig else code

    def find(self, job_id: str) -> str | None:
        out = _run(["squeue", "--states=all", "-h", f"--name=llm-mcp-{job_id}", "-o", "%i"], "looking up a job")
        ids = out.split()
        return ids[-1] if ids else None

    def signal_stop(self, engine_id: str) -> None:
        try:
            _run(["scancel", "--signal=TERM", engine_id], "signalling the job")
        except ConfigurationError:
            pass  # the cancel file stops it too; poll() ends it with scancel after the grace period

    def kill(self, engine_id: str) -> None:
        _run(["scancel", engine_id], "cancelling the job")

    def read_hardware(self) -> Hardware:
        """The partition's nodes: the configured partition, else the cluster's default one."""
        out = _run(["sinfo", "-h", "-o", "%P|%D|%c|%m|%G"], "reading the partitions")
        parts: dict[str, list[list[str]]] = {}  # sinfo gives one row per kind of node in a partition
        default = None
        for line in out.splitlines():
            row = line.strip().split("|")
            if len(row) == 5:
                name = row[0].rstrip("*")
                default = default or (name if row[0].endswith("*") else None)
                parts.setdefault(name, []).append(row)
        want = self.settings.slurm.get("partition") or default or next(iter(parts), None)
        if want not in parts:
            raise ConfigurationError(
                f"LLM_MCP_SLURM_PARTITION={want!r} is not a partition of this cluster; allowed: {sorted(parts)}"
            )

        def number(text: str) -> int:
            return int(re.sub(r"\D", "", text) or 0)

        rows = parts[want]
        gpus_of = [
            (int(m.group(2)), m.group(1)) if (m := re.search(r"gpu:(?:([\w.-]+):)?(\d+)", r[4])) else (0, None)
            for r in rows
        ]
        n_gpus = max(n for n, _ in gpus_of)  # plan for the partition's GPU nodes when it mixes kinds
        rows = [r for r, (n, _) in zip(rows, gpus_of) if n == n_gpus]
        kind = next((k for n, k in gpus_of if n == n_gpus and k), "gpu")
        per_gpu = self.settings.cluster_gpu_memory_gb
        ram = round(min(number(r[3]) for r in rows) / 1024, 1)
        return Hardware(
            gpus=[GPU(name=kind, memory_gb=per_gpu) for _ in range(n_gpus)],
            ram_gb=ram,
            available_ram_gb=ram,
            cpu_count=max(1, min(number(r[2]) for r in rows)),
            source=f"Slurm partition {want}",
            max_nodes=max(1, sum(number(r[1]) for r in rows)),
        )
