"""The MCP server: wiring only. Tools live in `llm_mcp.tools`, one module per concern.

Nothing here imports torch: start-up stays light, and heavy work runs in job processes or
behind a sampler created on first use.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ValidationError

from llm_mcp import __version__
from llm_mcp.tools import MODULES
from llm_mcp.tools.common import explain_arguments
from llm_mcp.tools.services import AppState

__all__ = ["INSTRUCTIONS", "AppState", "build_server"]
log = logging.getLogger("llm_mcp")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
JOB_POLL_S = 5.0

INSTRUCTIONS = """\
llm_mcp fine-tunes language models with LoRA, QLoRA, DoRA (Weight-Decomposed Low-Rank Adaptation)
and sparse fine-tuning. Start with list_models to see which models and methods are supported, what
they need in memory and whether they fit this machine; list_models(model=ID) gives one model in full.
start_finetune(dry_run=true) checks a request and shows the estimates; without dry_run it returns a
job id at once and trains in the background. Poll job_status(job_id, wait_seconds=30) until the job
succeeds, then sample(job_id=..., messages=[...]) from its adapter. Training data: datasets() lists and
inspects files; save_dataset(name, rows) writes rows you compose. cancel_job stops a job with a
checkpoint; start_finetune with the same model, method and dataset plus resume_from=JOB_ID continues it.
evaluate(targets=["base", JOB_ID], dataset=...) tells whether a fine-tune helped (loss, exact match,
preference accuracy on held-out rows). Preference tuning: start_finetune(objective="dpo", init_from=SFT_JOB_ID)
on rows {prompt, chosen, rejected}. Learning from rewards: start_finetune(objective="grpo", graders=[...]) on
rows {prompt, answer?, ...}; with graders=[{"grader": "agent"}] you are the judge: job_status shows the
pending_rollouts, submit_rewards(job_id, step, scores) answers them."""


async def watch_jobs(state: AppState, every_s: float = JOB_POLL_S) -> None:
    """Record jobs whose processes died and start queued ones, off the event loop, so tools only read."""
    while True:
        try:
            await anyio.to_thread.run_sync(state.executor.poll, abandon_on_cancel=True)
        except Exception as exc:  # a full disk or a busy database must not stop the watcher
            log.warning("job watcher: %s", exc)
        await anyio.sleep(every_s)


def where(state: AppState) -> str:
    """The state directory and what goes in it, for the instructions."""
    s = state.settings
    roots = [str(r) for r in s.roots[1:]]
    return (
        f"\n\nState directory (LLM_MCP_HOME): {s.home}. Relative paths in every tool are under it: datasets in "
        f"{s.home / 'data'} (datasets lists and inspects them; save_dataset writes rows you compose), local "
        f"checkpoints in {s.home / 'models'} (list_models shows them), exports in {s.home / 'exports'}."
        + (f" Also allowed: {roots}." if roots else "")
    )


class LlmMcpServer(MCPServer):
    """MCPServer whose argument-validation errors read like every other error of ours."""

    async def call_tool(self, name: str, arguments: dict, context: Context | None = None):
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                raise
            tool = self._tool_manager.get_tool(name)
            schema = tool.parameters if tool is not None else {}
            raise ToolError(explain_arguments(name, schema, exc.__cause__)) from exc.__cause__


def build_server(state: AppState, log_level: LogLevel = "WARNING") -> MCPServer:
    """The MCP server with every tool registered over `state`. Logs go to stderr only.

    `state` reaches the tools through the lifespan context; it is built (and its jobs
    re-attached) by the caller, once per process, whatever the transport's sessions do.
    """

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[AppState]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_jobs, state)
            try:
                yield state
            finally:
                tg.cancel_scope.cancel()

    home = state.settings.home
    mcp = LlmMcpServer(
        name="llm-mcp",
        version=__version__,
        instructions=INSTRUCTIONS + where(state),
        log_level=log_level,
        lifespan=lifespan,
    )
    for module in MODULES:
        module.register(mcp)
    for tool in mcp._tool_manager.list_tools():  # relative paths: say where they resolve, at run time
        tool.description = tool.description.replace("LLM_MCP_HOME", f"LLM_MCP_HOME ({home})")
        for prop in tool.parameters.get("properties", {}).values():
            if "LLM_MCP_HOME" in prop.get("description", ""):
                prop["description"] = prop["description"].replace("LLM_MCP_HOME", f"LLM_MCP_HOME ({home})")

    @mcp.resource(
        "llm-mcp://models.yaml",
        name="models.yaml",
        mime_type="application/yaml",
        description="The model support matrix this server validated at start-up.",
    )
    def matrix_resource() -> str:
        return state.settings.models_path.read_text(encoding="utf-8")

    return mcp
