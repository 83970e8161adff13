"""Where jobs run: the executor interface the tools and the CLI talk to.

An executor takes a job that validation has accepted and the store has recorded (state
'queued', its `config.json` written) and runs it to a final state. The store is the truth
about jobs: an executor records what happened there, so a restarted server re-attaches by
calling `reattach()` and nothing else. The engines: `LocalExecutor` (a supervisor process
per job on this machine, `llm_mcp.jobs.local`), `SlurmExecutor` (`llm_mcp.jobs.slurm`) and
`RayExecutor` (`llm_mcp.jobs.rayjobs`), the last two over `llm_mcp.jobs.cluster`.
"""

from __future__ import annotations

from typing import Protocol

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.hardware import Hardware
from llm_mcp.core.settings import Settings
from llm_mcp.core.store import Job, JobStore

EXECUTORS = ("local", "slurm", "ray")


class Executor(Protocol):
    """Runs queued jobs and reports on them through the job store."""

    name: str
    store: JobStore

    def submit(self, job_id: str) -> Job:
        """Hand a queued job to the engine (it may stay queued until there is capacity). Returns it as stored."""

    def poll(self) -> None:
        """Record jobs whose processes ended (with their cause), then start queued jobs that now fit."""

    def cancel(self, job_id: str) -> Job:
        """Stop a job: a queued one leaves the queue, a running one checkpoints and ends 'cancelled'.

        Idempotent: cancelling a finished job changes nothing.
        """

    def logs(self, job_id: str, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
        """The last lines of the job's training log."""

    def reattach(self) -> None:
        """After a server (re)start: pick up the jobs still running or queued from an earlier server."""

    def hardware(self) -> Hardware:
        """What one job may run on (this machine, or one node of the cluster and how many there are)."""

    def describe_submission(self, job_id: str, cfg, job_dir) -> dict | None:
        """What would be handed to the engine for this job (dry runs show it); None for local jobs."""

    def home_warning(self) -> str | None:
        """Why LLM_MCP_HOME may not work for this engine's jobs (a local disk and several nodes), else None."""


def make_executor(name: str, store: JobStore, settings: Settings | None = None) -> Executor:
    """The executor called `name` over `store` (cluster executors read their options from `settings`).

    Raises:
        ConfigurationError: an unknown executor name.
    """
    if name == "local":
        from llm_mcp.jobs.local import LocalExecutor

        return LocalExecutor(store)
    settings = settings or Settings.from_env()
    if name == "slurm":
        from llm_mcp.jobs.slurm import SlurmExecutor

        return SlurmExecutor(store, settings)
    if name == "ray":
        from llm_mcp.jobs.rayjobs import RayExecutor

        return RayExecutor(store, settings)
    raise ConfigurationError(f"executor={name!r}; allowed: {list(EXECUTORS)}")
