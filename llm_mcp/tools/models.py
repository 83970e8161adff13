"""list_models: the support matrix, local checkpoints, and what fits the hardware."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult
from pydantic import Field

from llm_mcp.core import listing
from llm_mcp.core.errors import LlmMcpError
from llm_mcp.core.hardware import Hardware
from llm_mcp.core.local_models import local_checkpoints, read_json, resolve_model
from llm_mcp.core.names import METHOD_NAMES
from llm_mcp.core.request import Request, choice
from llm_mcp.tools.common import READ_ONLY, add_tool, result, state_of


class ListModelsRequest(Request):
    model: str | None = Field(
        None, description="One model in full: a matrix id or alias, or a local checkpoint directory.", max_length=4096
    )
    method: choice(*METHOD_NAMES) | None = Field(  # type: ignore[valid-type]
        None, description="Only models where this method is supported or experimental."
    )
    type: choice("base", "instruct", "hybrid", "reasoning", "vision") | None = Field(  # type: ignore[valid-type]
        None, description="Only models of this type."
    )
    family: str | None = Field(None, description="Only this family, e.g. 'qwen3', 'llama', 'gemma3'.", max_length=64)
    fits: bool = Field(False, description="Only models that fit the hardware (this machine, or the hypothetical one).")
    gpu_memory_gb: float | None = Field(
        None, description="Plan for hypothetical GPUs of this size (GB) instead of this machine.", gt=0, le=4096
    )
    num_gpus: int = Field(1, description="Number of hypothetical GPUs.", ge=1, le=1024)


def list_models(ctx: Context, request: ListModelsRequest) -> Annotated[CallToolResult, listing.ListModelsResult]:
    """List the model support matrix: which models can be fine-tuned with which method.

    Methods: lora (low-rank adapters), qlora (LoRA over a 4-bit NF4 base), dora (DoRA,
    Weight-Decomposed Low-Rank Adaptation: LoRA on the weight direction plus a trained
    magnitude vector), sparse (dynamic sparse deltas with RigL-style mask updates; density
    defaults to LoRA rank 32's trainable count, and seed-style `sparsity_ratio` means the
    fraction NOT trained). Each method per model has a status (supported / experimental /
    unsupported) with a note, the minimum GPU memory, a memory estimate for this machine
    and whether vLLM can serve the result as an adapter. Also: recommended LoRA learning
    rate and rank, and the LoRA parameter count at that rank. Estimates and `fits` use
    start_finetune's defaults (batch 4 x 1024 tokens). The full listing also shows the local
    checkpoints in LLM_MCP_HOME/models and the allowed roots (pass their path as model=...).
    """
    state = state_of(ctx)
    r = request
    model, method, type, family, fits, gpu_memory_gb, num_gpus = (
        r.model,
        r.method,
        r.type,
        r.family,
        r.fits,
        r.gpu_memory_gb,
        r.num_gpus,
    )
    roots = [str(r) for r in state.settings.roots]
    key = (model, method, type, family, fits, gpu_memory_gb, num_gpus, *roots)
    cached = state.listing_cache.get(key)
    if cached is not None:
        return cached
    hardware = Hardware.hypothetical(gpu_memory_gb, num_gpus) if gpu_memory_gb else state.hardware()
    if model is not None:
        entry = resolve_model(state.matrix, state.settings, model)
        info = listing.describe_model(entry, hardware, state.defaults, full=True)
        hw = listing.hardware_info(hardware)
        found = listing.ListModelsResult(
            hardware=hw, filters={"model": model}, count=1, total_in_matrix=len(state.matrix.models), models=[info]
        )
        text = listing.summarize_one(info, hw)
    else:
        found = listing.list_models(
            state.matrix, hardware, state.defaults, method=method, type=type, family=family, fits=fits
        )
        found.local = _local(state, hardware)
        text = listing.summarize(found, method)
    found.allowed_roots = roots
    answer = result(f"{text}\nallowed roots (the tools read files only here): {', '.join(roots)}", found)
    state.listing_cache.put(key, answer)
    return answer


def _local(state, hardware: Hardware) -> list[listing.LocalCheckpoint]:
    """Every checkpoint directory here, described like a matrix row, or with the reason it cannot train."""
    home = state.settings.home.resolve()
    out = []
    for path in local_checkpoints(state.settings):
        shown = str(path.resolve().relative_to(home)) if path.resolve().is_relative_to(home) else str(path)
        try:
            entry = resolve_model(state.matrix, state.settings, str(path))
        except Exception as exc:  # one broken directory is listed with its problem; it never hides the others
            problem = str(exc) if isinstance(exc, LlmMcpError) else f"cannot be read ({type(exc).__name__}: {exc})"
            archs = read_json(path / "config.json").get("architectures")
            arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
            out.append(listing.LocalCheckpoint(path=shown, hf_architecture=arch, problem=problem))
            continue
        out.append(
            listing.LocalCheckpoint(
                path=shown,
                hf_architecture=entry.hf_architecture,
                model=listing.describe_model(entry, hardware, state.defaults),
            )
        )
    return out


def register(mcp: MCPServer) -> None:
    add_tool(mcp, list_models, ListModelsRequest, "List models", READ_ONLY)
