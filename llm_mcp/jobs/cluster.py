"""What the cluster executors (Slurm, Ray) share: submit, poll, cancel and re-attach through an engine.

A cluster job is handed to the engine as soon as it is recorded; the engine queues it. The job store
stays on the server's machine and only this server writes it: the job's processes, on whatever nodes,
write their log, metrics, checkpoints and result.json into the job directory, which therefore must be on
a filesystem every node shares (LLM_MCP_HOME). The engine's job id is stored with the job, so a
restarted server re-attaches by asking the engine about the ids it finds; nothing else is kept.

Cancel writes the job directory's cancel file (the trainer checkpoints and stops at its next step, on
every node) and signals the job through the engine; a job still running after the grace period is
stopped by the engine. A job the engine ended without being asked here (scancel, `ray job stop`, a time
limit, preemption, a lost node) ends 'failed' with that cause and, when it checkpointed, a resume step.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.hardware import Hardware
from llm_mcp.core.jobconfig import EvalConfig, JobConfig
from llm_mcp.core.jobdir import log_tail, read_result, request_cancel
from llm_mcp.core.settings import Settings
from llm_mcp.core.store import FINAL_STATES, Job, JobStore
from llm_mcp.jobs.local import job_environment
from llm_mcp.jobs.outcome import finalize

CANCEL_GRACE_S = float(os.environ.get("LLM_MCP_CANCEL_GRACE_S", "60"))
KILL_RETRY_S = 30.0  # a hard stop that did not take is sent again after this long
SUBMIT_TIMEOUT_S = 60.0  # a job recorded this long ago without an engine id is looked up by name, else failed
RESULT_GRACE_S = 30.0  # on a network filesystem, wait this long for an ended job's result.json to show
EXIT_GRACE_S = 20.0  # a job whose trainer wrote its final result but whose engine job still runs is ended then
log = logging.getLogger(__name__)
HARDWARE_TTL_S = 30.0
# Filesystems that are local to one machine: a multi-node cluster's nodes cannot see a job directory on them.
LOCAL_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs")


@dataclass(frozen=True)
class EngineJob:
    """One job as the engine reports it.

    phase: 'pending' (queued by the engine), 'running', or 'ended'. For an ended job, `outside` is the
    cause when the engine itself stopped it (None when the job's own processes ended, in any way).
    """

    phase: str
    state: str  # the engine's own word: PENDING, RUNNING, COMPLETED, TIMEOUT, STOPPED, ...
    reason: str = ""  # why it waits (Slurm: Resources, Priority, ...) or why it ended
    nodes: str = ""
    exit_code: int | None = None
    outside: str | None = None

    @property
    def label(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason and self.reason != "None" else self.state


def local_filesystem(path: Path) -> str | None:
    """The filesystem type of `path` when it is one that only this machine sees, else None (Linux; None elsewhere)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if (
            len(parts) >= 3
            and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"))
            and len(parts[1]) >= len(best)
        ):
            best, fstype = parts[1], parts[2]
    return fstype if fstype in LOCAL_FILESYSTEMS else None


class ClusterExecutor:
    """The engine-independent half of a cluster executor; subclasses talk to one engine."""

    name = "cluster"
    engine = "the cluster"

    def __init__(self, store: JobStore, settings: Settings):
        self.store, self.settings = store, settings
        self.python = settings.cluster_python or sys.executable
        self._hardware: tuple[float, Hardware] | None = None
        self._killed: dict[str, float] = {}  # job id -> when poll() last sent the hard stop
        self._ended: dict[str, float] = {}  # job id -> when the engine was first seen to report it ended
        self._resulted: dict[str, float] = {}  # job id -> when its final result.json was first seen while it ran

    # ---- what an engine implements ------------------------------------------------------------------
    def describe_submission(self, job_id: str, cfg: JobConfig | EvalConfig, job_dir: Path) -> dict:
        """What would be sent to the engine for this job: {'kind': ..., ...} (dry runs show it)."""
        raise NotImplementedError

    def send(self, job_id: str, submission: dict) -> str:
        """Send a submission; returns the engine's id for it. Raises ConfigurationError with the engine's words."""
        raise NotImplementedError

    def query(self, engine_ids: list[str]) -> dict[str, EngineJob]:
        """The engine's view of these jobs; an id the engine no longer knows is left out."""
        raise NotImplementedError

    def signal_stop(self, engine_id: str) -> None:
        """Ask a running job to stop (the trainer checkpoints on SIGTERM)."""

    def kill(self, engine_id: str) -> None:
        """Stop a job now (pending ones leave the queue)."""
        raise NotImplementedError

    def read_hardware(self) -> Hardware:
        raise NotImplementedError

    # ---- the executor interface ---------------------------------------------------------------------
    def hardware(self) -> Hardware:
        """One node of the cluster as the fit check plans for it (max_nodes: how many such nodes there are)."""
        now = time.monotonic()
        if self._hardware is None or now - self._hardware[0] > HARDWARE_TTL_S:
            self._hardware = (now, self.read_hardware())
        return self._hardware[1]

    def environment(self, cfg: JobConfig | EvalConfig, cpus: int) -> dict[str, str]:
        """The variables every process of a job gets on every node (the token is added only where it is sent)."""
        env = job_environment(cfg, cpus, self.settings.home)
        if self.settings.cluster_ifname:  # the interface the nodes reach each other on (gloo and NCCL alike)
            env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = self.settings.cluster_ifname
        return env

    def find(self, job_id: str) -> str | None:
        """The engine's id of a job submitted under this job id (a server that died before recording it)."""
        raise NotImplementedError

    def submit(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        try:
            submission = self.describe_submission(job_id, job.config, self.store.job_dir(job_id))
            engine_id = self.send(job_id, submission)
        except Exception as exc:  # any failure to submit ends the job with its cause, never a stuck 'queued'
            self.store.update(
                job_id,
                expect=("queued",),
                state="failed",
                finished_at=time.time(),
                error=f"{self.engine} did not take the job: {exc}",
                next_step="fix the cluster settings or the request, then start the job again",
            )
            return self.store.get(job_id)
        self.store.update(job_id, engine_id=engine_id, engine_state="SUBMITTED")
        return self.store.get(job_id)

    def poll(self) -> None:
        """Bring every active job of this engine up to date; one job's trouble never stops the others."""
        jobs = self.store.list(limit=1000, states=("queued", "running"), engine=self.name)
        now = time.time()
        for job in [j for j in jobs if not j.engine_id and now - j.created_at > SUBMIT_TIMEOUT_S]:
            self._adopt(job)
        jobs = [j for j in jobs if j.engine_id]
        if not jobs:
            return
        seen = self.query([j.engine_id for j in jobs if j.engine_id])
        for job in jobs:
            try:
                self._update(job, seen.get(job.engine_id or ""), now)
            except Exception as exc:  # recorded on the next poll; the watcher logs it
                log.warning("%s job %s: %s", self.engine, job.id, exc)

    def _adopt(self, job: Job) -> None:
        """A job recorded but never marked submitted (the server died mid-submit): find it, or fail it."""
        engine_id = self.find(job.id)
        if engine_id:
            self.store.update(job.id, engine_id=engine_id, engine_state="SUBMITTED")
        else:
            self.store.update(
                job.id,
                expect=("queued",),
                state="failed",
                finished_at=time.time(),
                error=f"the job was recorded but never reached {self.engine}",
                next_step="start it again",
            )

    def _update(self, job: Job, ej: EngineJob | None, now: float) -> None:
        job_dir = self.store.job_dir(job.id)
        if ej is None or ej.phase == "ended":
            has_result = (job_dir / "result.json").exists()
            if not has_result and not job.cancel_requested and self._result_may_be_late(job, now):
                return  # a shared filesystem may show the node's result.json a little later
            outside = ej.outside if ej else None
            if not has_result and not (job_dir / "train.log").exists():
                outside = outside or (
                    f"{self.engine} job {job.engine_id} ended without writing to its directory: "
                    f"is LLM_MCP_HOME ({self.settings.home}) mounted on the nodes?"
                )
            elif ej is None and not has_result:
                outside = f"{self.engine} no longer knows job {job.engine_id} and it left no result"
            if ej is not None:
                self.store.update(job.id, engine_state=ej.label, nodes=ej.nodes or job.nodes)
            finalize(self.store, job, ej.exit_code if ej else None, outside=outside)
            return
        if ej.phase == "running" and ej.state != "COMPLETING" and self._lingers(job, now):
            # The trainer ended (result.json) but the engine's job did not: a rank waiting on a lost node, a
            # launcher waiting on a dead node's daemon. Record the end now and stop what is left.
            self.store.update(job.id, engine_state=ej.label, nodes=ej.nodes or job.nodes)
            finalize(self.store, job, None)
            self._resulted.pop(job.id, None)
            self.kill(job.engine_id or "")
            return
        fields: dict[str, Any] = {"engine_state": ej.label, "nodes": ej.nodes or job.nodes}
        if ej.phase == "running" and job.state == "queued":
            self.store.update(job.id, expect=("queued",), state="running", started_at=now, **fields)
        else:
            self.store.update(job.id, **fields)
        if job.cancel_at and now - job.cancel_at > CANCEL_GRACE_S and now - self._killed.get(job.id, 0) > KILL_RETRY_S:
            self._killed[job.id] = now
            self.kill(job.engine_id or "")  # it did not stop within the grace period

    def _lingers(self, job: Job, now: float) -> bool:
        """True once the job's final result.json has been there for EXIT_GRACE_S while the engine still runs it."""
        result = read_result(self.store.job_dir(job.id))
        if not result or result.get("state") not in FINAL_STATES:
            return False
        return now - self._resulted.setdefault(job.id, now) > EXIT_GRACE_S

    def _result_may_be_late(self, job: Job, now: float) -> bool:
        """True while an ended job's result file may still be on its way (not on a local filesystem)."""
        if local_filesystem(self.settings.home):
            return False
        first = self._ended.setdefault(job.id, now)
        return now - first < RESULT_GRACE_S

    def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.state not in ("queued", "running"):
            return job
        try:
            ej = self.query([job.engine_id]).get(job.engine_id) if job.engine_id else None
        except ConfigurationError:
            ej = EngineJob("running", "UNKNOWN")  # cannot ask: the cancel file and the grace still stop it
        if ej is not None and ej.phase == "ended":
            self.poll()  # it ended on its own: record how, not a cancel
            return self.store.get(job_id)
        self.store.update(job_id, cancel_requested=1, cancel_at=job.cancel_at or time.time())
        request_cancel(self.store.job_dir(job_id))
        if ej is None or ej.phase == "pending":
            if job.engine_id:
                self.kill(job.engine_id)  # never started: nothing to checkpoint
            self.store.update(
                job_id,
                expect=("queued",),
                state="cancelled",
                finished_at=time.time(),
                engine_state=ej.label if ej else job.engine_state,
            )
        else:
            self.signal_stop(
                job.engine_id or ""
            )  # with the cancel file: checkpoint, then stop; poll() enforces the grace
        return self.store.get(job_id)

    def logs(self, job_id: str, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
        return log_tail(self.store.job_dir(job_id), lines=lines, max_bytes=max_bytes)

    def reattach(self) -> None:
        self.poll()

    def node_count(self) -> int:
        """Nodes a job of this engine may land on (the fit check's node count, unless the engine knows better)."""
        return self.hardware().max_nodes

    def home_warning(self) -> str | None:
        """A warning when LLM_MCP_HOME is on a filesystem other nodes cannot see and the cluster has several."""
        nodes = self.node_count()
        fstype = local_filesystem(self.settings.home) if nodes > 1 else None
        if fstype:
            return (
                f"LLM_MCP_HOME={self.settings.home} is on a local {fstype} filesystem, but {self.engine} has "
                f"{nodes} nodes: jobs on other nodes will not find their directory. Put "
                "LLM_MCP_HOME on a filesystem every node mounts (NFS, Lustre, GPFS, ...)"
            )
        return None


def shell_join(words: list[str], raw: tuple[str, ...] = ()) -> str:
    """Quote words for a POSIX shell, except those in `raw` (shell variables meant to expand where it runs)."""
    return " ".join(w if w in raw else shlex.quote(w) for w in words)
