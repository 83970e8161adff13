"""The MCP server: tool definitions and wiring. Business logic lives in the modules it calls.

Nothing here imports torch: start-up stays light, and heavy work runs in job processes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from llm_mcp import __version__
from llm_mcp.hardware import Hardware, detect
from llm_mcp import listing
from llm_mcp.local_models import resolve_model
from llm_mcp.matrix import Matrix, load_matrix
from llm_mcp.methods import MethodDefaults, load_method_defaults
from llm_mcp.settings import Settings

log = logging.getLogger("llm_mcp")

INSTRUCTIONS = """\
llm_mcp fine-tunes language models with LoRA, QLoRA, DoRA (Weight-Decomposed Low-Rank Adaptation)
and sparse fine-tuning. Start with list_models to see which models and methods are supported, what
they need in memory and whether they fit this machine; list_models(model=ID) gives one model in full."""

MethodName = Literal["lora", "qlora", "dora", "sparse"]
ModelTypeName = Literal["base", "instruct", "hybrid", "reasoning", "vision"]


@dataclass
class AppState:
    """Process-wide state shared by every session (stdio or HTTP)."""

    settings: Settings
    matrix: Matrix
    defaults: dict[str, MethodDefaults]

    @classmethod
    def load(cls, settings: Settings) -> AppState:
        """Validate the matrix and method configs; raises ConfigurationError listing every problem."""
        return cls(settings=settings, matrix=load_matrix(settings.models_path), defaults=load_method_defaults())


def build_server(state: AppState, log_level: str = "WARNING") -> MCPServer:
    """Create the MCP server with every tool registered. Logs go to stderr only."""
    mcp = MCPServer(name="llm-mcp", version=__version__, instructions=INSTRUCTIONS, log_level=log_level)

    def tool(title: str, annotations: ToolAnnotations) -> Callable[[Callable], Callable]:
        """Register a tool; its dedented docstring is the description the model reads."""

        def register(fn: Callable) -> Callable:
            mcp.add_tool(fn, title=title, description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations)
            return fn

        return register

    @tool("List models", ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    def list_models(
        model: Annotated[
            str | None,
            Field(description="One model in full: a matrix id or alias, or a local checkpoint directory."),
        ] = None,
        method: Annotated[
            MethodName | None,
            Field(description="Only models where this method is supported or experimental."),
        ] = None,
        type: Annotated[ModelTypeName | None, Field(description="Only models of this type.")] = None,
        family: Annotated[
            str | None, Field(description="Only this family, e.g. 'qwen3', 'llama', 'gemma3'.", max_length=64)
        ] = None,
        fits: Annotated[
            bool, Field(description="Only models that fit the hardware (this machine, or the hypothetical one).")
        ] = False,
        gpu_memory_gb: Annotated[
            float | None,
            Field(description="Plan for hypothetical GPUs of this size (GB) instead of this machine.", gt=0, le=4096),
        ] = None,
        num_gpus: Annotated[int, Field(description="Number of hypothetical GPUs.", ge=1, le=1024)] = 1,
    ) -> Annotated[CallToolResult, listing.ListModelsResult]:
        """List the model support matrix: which models can be fine-tuned with which method.

        Methods: lora (low-rank adapters), qlora (LoRA over a 4-bit NF4 base), dora (DoRA,
        Weight-Decomposed Low-Rank Adaptation: LoRA on the weight direction plus a trained
        magnitude vector), sparse (dynamic sparse deltas with RigL-style mask updates; density
        defaults to LoRA rank 32's trainable count, and seed-style `sparsity_ratio` means the
        fraction NOT trained). Each method per model has a status (supported / experimental /
        unsupported) with a note, the minimum GPU memory, a memory estimate for this machine
        and whether vLLM can serve the result as an adapter. Also: recommended LoRA learning
        rate and rank, and the LoRA parameter count at that rank.
        """
        hardware = Hardware.hypothetical(gpu_memory_gb, num_gpus) if gpu_memory_gb else detect()
        if model is not None:
            entry = resolve_model(state.matrix, state.settings, model)
            info = listing.describe_model(entry, hardware, state.defaults, full=True)
            hw = listing.hardware_info(hardware)
            result = listing.ListModelsResult(
                hardware=hw, filters={"model": model}, count=1,
                total_in_matrix=len(state.matrix.models), models=[info],
            )
            text = listing.summarize_one(info, hw)
        else:
            result = listing.list_models(
                state.matrix, hardware, state.defaults, method=method, type=type, family=family, fits=fits
            )
            text = listing.summarize(result, method)
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content=result.model_dump(mode="json", exclude_none=True),
        )

    @mcp.resource("llm-mcp://models.yaml", name="models.yaml", mime_type="application/yaml",
                  description="The model support matrix this server validated at start-up.")
    def matrix_resource() -> str:
        return state.settings.models_path.read_text(encoding="utf-8")

    return mcp
