"""The MCP server: wiring only. Tools live in `llm_mcp.tools`, one module per concern.

Nothing here imports torch: start-up stays light, and heavy work runs in job processes or
behind a sampler created on first use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server.mcpserver import MCPServer

from llm_mcp import __version__
from llm_mcp.tools import MODULES
from llm_mcp.tools.services import AppState

__all__ = ["AppState", "INSTRUCTIONS", "build_server"]

INSTRUCTIONS = """\
llm_mcp fine-tunes language models with LoRA, QLoRA, DoRA (Weight-Decomposed Low-Rank Adaptation)
and sparse fine-tuning. Start with list_models to see which models and methods are supported, what
they need in memory and whether they fit this machine; list_models(model=ID) gives one model in full.
start_finetune(dry_run=true) checks a request and shows the estimates; without dry_run it returns a
job id at once and trains in the background. Poll job_status(job_id, wait_seconds=30) until the job
succeeds; cancel_job stops it with a checkpoint, and start_finetune(resume_from=JOB_ID) continues it."""


def build_server(state: AppState, log_level: str = "WARNING") -> MCPServer:
    """The MCP server with every tool registered over `state`. Logs go to stderr only.

    `state` reaches the tools through the lifespan context; it is built (and its jobs
    re-attached) by the caller, once per process, whatever the transport's sessions do.
    """

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[AppState]:
        yield state

    mcp = MCPServer(name="llm-mcp", version=__version__, instructions=INSTRUCTIONS, log_level=log_level,
                    lifespan=lifespan)
    for module in MODULES:
        module.register(mcp)

    @mcp.resource("llm-mcp://models.yaml", name="models.yaml", mime_type="application/yaml",
                  description="The model support matrix this server validated at start-up.")
    def matrix_resource() -> str:
        return state.settings.models_path.read_text(encoding="utf-8")

    return mcp
