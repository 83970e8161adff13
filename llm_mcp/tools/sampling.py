"""sample: generate from a job's adapter, an adapter directory or a base model (in-process or vLLM)."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field

from llm_mcp.core.layouts import LAYOUTS, layout_of
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.request import Request
from llm_mcp.core.rows import ROLES
from llm_mcp.inference.sampling import MAX_N, MAX_PROMPT_CHARS, MAX_TOKENS_LIMIT, Completion, SampleParams
from llm_mcp.inference.serving import plan_vllm_sample
from llm_mcp.inference.serving.servers import VllmStarting
from llm_mcp.inference.targets import Target, adapter_base, job_adapter, job_target, trained_on_4bit
from llm_mcp.tools.common import add_tool, result, state_of, with_progress

if TYPE_CHECKING:
    from llm_mcp.tools.services import AppState


class SampleSource(BaseModel):
    base_model: str
    job_id: str | None = None
    checkpoint: str | None = Field(None, description="'final' or 'step N'.")
    adapter_path: str | None = None


class SampleResult(BaseModel):
    state: str = Field(
        "done",
        description="'done'; or 'starting' (vLLM is loading) / 'merging' (the merged model "
        "is being written): no completions yet, call again after retry_after_s.",
    )
    retry_after_s: float | None = None
    completions: list[Completion] = []
    base_completions: list[Completion] | None = Field(None, description="compare_base: the base model's answers.")
    source: SampleSource
    backend: str = Field(description="Which backend generated: 'transformers' (in-process) or 'vllm'.")
    prompt_tokens: int = 0
    load_s: float = 0.0
    base_loaded: bool = False
    adapter_loaded: bool = False
    generate_s: float = 0.0
    tokens_per_s: float = 0.0
    notes: list[str] = []


class SampleRequest(Request):
    path_fields: ClassVar[tuple[str, ...]] = ("adapter", "model")

    job_id: str | None = Field(None, description="Sample from this job's adapter.", max_length=128)
    adapter: str | None = Field(
        None, description="Or: a PEFT adapter directory (under an allowed root).", max_length=4096
    )
    model: str | None = Field(
        None, description="Or: a base model only (matrix id or local directory).", max_length=4096
    )
    prompt: str | None = Field(
        None, description="Raw text prompt (no chat template).", min_length=1, max_length=MAX_PROMPT_CHARS
    )
    messages: list[dict[str, str]] | None = Field(
        None, description="Chat messages [{role, content}], rendered with the model's chat template."
    )
    max_tokens: int = Field(128, description=f"New tokens, 1-{MAX_TOKENS_LIMIT}.", ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.0, description="0 = greedy (deterministic); up to 2.", ge=0, le=2)
    top_p: float = Field(1.0, description="Nucleus sampling, (0, 1].", ge=1e-6, le=1)
    top_k: int = Field(0, description="0 = off.", ge=0, le=100_000)
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, description="Stop strings (up to 4).", max_length=4
    )
    n: int = Field(1, description=f"Completions, 1-{MAX_N} (n > 1 needs temperature > 0).", ge=1, le=MAX_N)
    seed: int | None = Field(None, description="Makes sampling with temperature > 0 repeatable.")
    checkpoint: str = Field(
        "final", description="'final' (default), 'latest' (works while the job runs) or a step number.", max_length=32
    )
    compare_base: bool = Field(False, description="Also generate with the base model (adapter off).")
    logprobs: bool = Field(
        False, description="Each generated token's log-probability under the model (before temperature / top-p)."
    )

    def check(self) -> list[str]:
        problems = []
        if sum(x is not None for x in (self.job_id, self.adapter, self.model)) != 1:
            problems.append("give exactly one of job_id, adapter or model")
        if (self.prompt is None) == (self.messages is None):
            problems.append("give exactly one of prompt or messages")
        if self.messages is not None:
            if not self.messages or any(set(m) != {"role", "content"} or m["role"] not in ROLES for m in self.messages):
                problems.append(f"messages must be a non-empty list of {{role, content}} with role in {list(ROLES)}")
            elif sum(len(m["content"]) for m in self.messages) > MAX_PROMPT_CHARS:
                problems.append(f"messages exceed {MAX_PROMPT_CHARS} characters")
        if self.n > 1 and self.temperature == 0:
            problems.append("n > 1 needs temperature > 0 (greedy decoding gives n identical answers)")
        return problems


async def sample(ctx: Context, request: SampleRequest) -> Annotated[CallToolResult, SampleResult]:
    """Generate text from a fine-tuned adapter (a finished job, a running job's latest
    checkpoint, or an adapter directory) or from a base model. Returns the completions with
    finish reason and token counts, the adapter / checkpoint used, the backend, and timing.
    The base model is loaded once and kept; switching adapters does not reload it.
    """
    r = request
    state = state_of(ctx)
    source, target = await anyio.to_thread.run_sync(_sample_target, state, r.job_id, r.adapter, r.model, r.checkpoint)
    notes: list[str] = []
    generate = state.sampler.generate
    vllm_target: Target | None = None  # what vLLM serves for `target` (a merged model for DoRA / sparse)
    if state.backend == "vllm":
        plan = await anyio.to_thread.run_sync(
            plan_vllm_sample, state.settings, state.store, target, source.job_id, source.checkpoint
        )
        notes = plan.notes
        if plan.target is None:  # a merged model is being written for vLLM
            if not answers_in_process(target):
                return _waiting("merging", source, notes, 20)
            notes.append(IN_PROCESS_NOTE.format(what="the merged model for vLLM is being written"))
            generate = state.in_process_sampler.generate
        else:
            vllm_target = plan.target
            quick = answers_in_process(target)  # vLLM not ready at once: answer in-process instead of waiting
            generate = functools.partial(state.sampler.generate, label=plan.label, wait_s=0 if quick else None)
    params = SampleParams(
        prompt=r.prompt,
        messages=r.messages,
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        stop=list(r.stop or []),
        n=r.n,
        seed=r.seed,
        logprobs=r.logprobs,
        deadline=time.monotonic() + state.settings.sample_timeout_s if state.settings.sample_timeout_s else None,
        cancel=threading.Event(),
    )
    with state.sample_slots:
        try:
            gen = await with_progress(
                ctx,
                generate,
                vllm_target or target,
                params,
                message=lambda: state.activity(target.base_id),
                cancel=params.cancel,
            )
        except VllmStarting as exc:
            if not answers_in_process(target):
                return _waiting("starting", source, [*notes, str(exc)], 15)
            notes.append(IN_PROCESS_NOTE.format(what="vLLM is still starting"))
            generate, vllm_target = state.in_process_sampler.generate, None
            params = dataclasses.replace(params, cancel=threading.Event())
            gen = await with_progress(
                ctx, generate, target, params, message=lambda: state.activity(target.base_id), cancel=params.cancel
            )
        base_gen = None
        if r.compare_base and (vllm_target or target).adapter_path:
            params = dataclasses.replace(params, cancel=threading.Event())
            base_gen = await with_progress(
                ctx,
                generate,
                dataclasses.replace(vllm_target or target, adapter_path=None),
                params,
                message=lambda: "generating with the base model",
                cancel=params.cancel,
            )
        elif r.compare_base:
            notes.append("compare_base: this result is served as a merged model; sample model=BASE to compare")
    answer = SampleResult(
        completions=gen.completions,
        base_completions=base_gen.completions if base_gen else None,
        source=source,
        backend=gen.backend,
        prompt_tokens=gen.prompt_tokens,
        load_s=gen.load_s,
        base_loaded=gen.base_loaded,
        adapter_loaded=gen.adapter_loaded,
        generate_s=gen.generate_s,
        tokens_per_s=gen.tokens_per_s,
        notes=notes,
    )
    return result(summarize(answer), answer)


IN_PROCESS_MAX_BYTES = 2 << 30  # a base model this small loads and answers in-process within a call
IN_PROCESS_NOTE = "{what}: this answer came from the in-process sampler (transformers); later calls use vLLM"


def answers_in_process(target: Target) -> bool:
    """Whether the in-process sampler can answer for `target` within a call while vLLM is not ready: a local base
    model whose weights are at most IN_PROCESS_MAX_BYTES."""
    base = Path(target.base_path)
    weights = [*base.glob("*.safetensors"), *base.glob("*.bin")] if base.is_dir() else []
    return bool(weights) and sum(p.stat().st_size for p in weights) <= IN_PROCESS_MAX_BYTES


def _waiting(what: str, source: SampleSource, notes: list[str], retry_after_s: float) -> CallToolResult:
    """Not an error: the backend is getting ready. The result says so, with when to call again."""
    answer = SampleResult(state=what, retry_after_s=retry_after_s, source=source, backend="vllm", notes=notes)
    return result(f"{what}: no completions yet; call sample again in ~{retry_after_s:g} s. " + " ".join(notes), answer)


def summarize(r: SampleResult) -> str:
    src = r.source
    head = (
        f"{r.backend}: {src.base_model}"
        + (f" + job {src.job_id} ({src.checkpoint})" if src.job_id else "")
        + (f" + adapter {src.adapter_path}" if src.adapter_path and not src.job_id else "")
        + f" | {r.prompt_tokens} prompt tokens, {r.tokens_per_s:g} tokens/s, load {r.load_s:g} s"
    )
    lines = [head]
    for i, c in enumerate(r.completions):
        lines.append(f"[{i}] ({c.finish_reason}, {c.completion_tokens} tokens) {c.text}")
    for i, c in enumerate(r.base_completions or []):
        lines.append(f"[base {i}] ({c.finish_reason}, {c.completion_tokens} tokens) {c.text}")
    return "\n".join(lines)


def _sample_target(state: AppState, job_id, adapter, model, checkpoint) -> tuple[SampleSource, Target]:
    if job_id is not None:
        job = state.store.get(job_id)
        adapter_dir, label = job_adapter(state.store, job, checkpoint)
        return (
            SampleSource(base_model=job.model, job_id=job.id, checkpoint=label, adapter_path=str(adapter_dir)),
            job_target(job, adapter_dir),
        )
    path = None
    if adapter is not None:
        path = state.settings.check_path(state.settings.under_home(adapter), "adapter")
        entry = resolve_model(state.matrix, state.settings, adapter_base(path))
    else:
        entry = resolve_model(state.matrix, state.settings, model or "")
    target = Target(
        base_path=getattr(entry, "path", entry.id),
        base_id=entry.id,
        adapter_path=str(path) if path else None,
        trust_remote_code=entry.trust_remote_code,
        layout=(layout_of(path) or LAYOUTS["peft"]).name if path else "peft",
        quantized=trained_on_4bit(path) if path else False,
    )
    return SampleSource(base_model=entry.id, adapter_path=target.adapter_path), target


def register(mcp: MCPServer) -> None:
    add_tool(
        mcp,
        sample,
        SampleRequest,
        "Sample",
        ToolAnnotations(read_only_hint=True, idempotent_hint=False, open_world_hint=False),
    )
