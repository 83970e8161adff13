"""sample: generate from a job's adapter, an adapter directory or a base model (in-process or vLLM)."""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.local_models import resolve_model
from llm_mcp.inference.sampling import MAX_N, MAX_PROMPT_CHARS, MAX_TOKENS_LIMIT, Completion, SampleParams
from llm_mcp.inference.serving import job_serving_target
from llm_mcp.inference.serving.servers import VllmStarting
from llm_mcp.inference.targets import Target, adapter_base, job_adapter, job_target
from llm_mcp.tools.common import add_tool, result, state_of, summarize_sample, with_progress

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


async def sample(
    ctx: Context,
    job_id: Annotated[str | None, Field(description="Sample from this job's adapter.", max_length=128)] = None,
    adapter: Annotated[str | None, Field(description="Or: a PEFT adapter directory (under an allowed root).")] = None,
    model: Annotated[str | None, Field(description="Or: a base model only (matrix id or local directory).")] = None,
    prompt: Annotated[str | None, Field(description="Raw text prompt (no chat template).")] = None,
    messages: Annotated[
        list[dict[str, str]] | None,
        Field(description="Chat messages [{role, content}], rendered with the model's chat template."),
    ] = None,
    max_tokens: Annotated[int, Field(description=f"New tokens, 1-{MAX_TOKENS_LIMIT}.")] = 128,
    temperature: Annotated[float, Field(description="0 = greedy (deterministic); up to 2.")] = 0.0,
    top_p: Annotated[float, Field(description="Nucleus sampling, (0, 1].")] = 1.0,
    top_k: Annotated[int, Field(description="0 = off.")] = 0,
    stop: Annotated[list[str] | None, Field(description="Stop strings (up to 4).")] = None,
    n: Annotated[int, Field(description=f"Completions, 1-{MAX_N} (n > 1 needs temperature > 0).")] = 1,
    seed: Annotated[int | None, Field(description="Makes sampling with temperature > 0 repeatable.")] = None,
    checkpoint: Annotated[
        str, Field(description="'final' (default), 'latest' (works while the job runs) or a step number.")
    ] = "final",
    compare_base: Annotated[bool, Field(description="Also generate with the base model (adapter off).")] = False,
    logprobs: Annotated[bool, Field(description="Per-token log-probabilities.")] = False,
) -> Annotated[CallToolResult, SampleResult]:
    """Generate text from a fine-tuned adapter (a finished job, a running job's latest
    checkpoint, or an adapter directory) or from a base model. Returns the completions with
    finish reason and token counts, the adapter / checkpoint used, the backend, and timing.
    The base model is loaded once and kept; switching adapters does not reload it.
    """
    _check_request(job_id, adapter, model, prompt, messages, max_tokens, temperature, top_p, top_k, stop, n)
    state = state_of(ctx)
    source, target = _sample_target(state, job_id, adapter, model, checkpoint)
    notes: list[str] = []
    generate = state.sampler.generate
    if state.backend == "vllm":
        label = None
        if source.job_id:
            served, label, notes = await anyio.to_thread.run_sync(
                job_serving, state, source.job_id, source.checkpoint, target
            )
            if served is None:
                return _waiting(
                    "merging",
                    source,
                    notes + ["the merged model is still being written; call sample again in ~20 s"],
                    20,
                )
            target, label = served, label if served.adapter_path else None
        generate = functools.partial(state.sampler.generate, label=label)
    params = SampleParams(
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop or []),
        n=n,
        seed=seed,
        logprobs=logprobs,
        time_limit_s=state.settings.sample_timeout_s or None,
        cancel=threading.Event(),
    )
    with state.sample_slots:
        try:
            gen = await with_progress(
                ctx, generate, target, params, message=lambda: activity(state, target.base_id), cancel=params.cancel
            )
        except VllmStarting as exc:
            return _waiting("starting", source, notes + [str(exc)], 15)
        base_gen = None
        if compare_base and target.adapter_path:
            params = dataclasses.replace(params, cancel=threading.Event())
            base_gen = await with_progress(
                ctx,
                generate,
                Target(**{**target.__dict__, "adapter_path": None}),
                params,
                message=lambda: "generating with the base model",
                cancel=params.cancel,
            )
        elif compare_base:
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
    return result(summarize_sample(answer), answer)


def _waiting(what: str, source: SampleSource, notes: list[str], retry_after_s: float) -> CallToolResult:
    """Not an error: the backend is getting ready. The result says so, with when to call again."""
    answer = SampleResult(state=what, retry_after_s=retry_after_s, source=source, backend="vllm", notes=notes)
    return result(f"{what}: no completions yet; call sample again in ~{retry_after_s:g} s. " + " ".join(notes), answer)


def _check_request(job_id, adapter, model, prompt, messages, max_tokens, temperature, top_p, top_k, stop, n) -> None:
    """Every problem with a sample request, raised together."""
    problems = []
    sources = [x for x in (job_id, adapter, model) if x is not None]
    if len(sources) != 1:
        problems.append("give exactly one of job_id, adapter or model")
    if (prompt is None) == (messages is None):
        problems.append("give exactly one of prompt or messages")
    if prompt is not None and not (0 < len(prompt) <= MAX_PROMPT_CHARS):
        problems.append(f"prompt must have 1-{MAX_PROMPT_CHARS} characters (got {len(prompt)})")
    if messages is not None:
        from llm_mcp.core.rows import ROLES

        if not messages or any(set(m) != {"role", "content"} or m["role"] not in ROLES for m in messages):
            problems.append(f"messages must be a non-empty list of {{role, content}} with role in {list(ROLES)}")
        elif sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
            problems.append(f"messages exceed {MAX_PROMPT_CHARS} characters")
    checks = [
        ("max_tokens", max_tokens, 1, MAX_TOKENS_LIMIT),
        ("temperature", temperature, 0, 2),
        ("top_p", top_p, 1e-6, 1),
        ("top_k", top_k, 0, 100_000),
        ("n", n, 1, MAX_N),
    ]
    for name, value, lo, hi in checks:
        if value != value or not lo <= value <= hi:
            problems.append(f"{name}={value!r} is out of range; allowed: {lo:g} to {hi:g}")
    if n > 1 and temperature == 0:
        problems.append("n > 1 needs temperature > 0 (greedy decoding gives n identical answers)")
    if stop and (len(stop) > 4 or any(not s or len(s) > 200 for s in stop)):
        problems.append("stop: up to 4 non-empty strings of at most 200 characters")
    if problems:
        raise InvalidArgumentError(problems)


def activity(state: AppState, base_id: str) -> str:
    """What a long sample / serve call is doing, for its progress notifications."""
    starting = state.starting_servers()
    return f"starting vLLM for {starting[0]}" if starting else f"generating with {base_id}"


def job_serving(state: AppState, job_id: str, label: str, target: Target):
    """What vLLM serves for a job's adapter: (target or None while merging, model name, notes)."""
    job = state.store.get(job_id)
    return job_serving_target(
        state.settings, job, state.store.job_dir(job.id), Path(target.adapter_path), label, target
    )


def _sample_target(state: AppState, job_id, adapter, model, checkpoint) -> tuple[SampleSource, Target]:
    if job_id is not None:
        job = state.store.get(job_id)
        path, label = job_adapter(state.store, job, checkpoint)
        return (
            SampleSource(base_model=job.model, job_id=job.id, checkpoint=label, adapter_path=str(path)),
            job_target(job, path),
        )
    if adapter is not None:
        path = state.settings.check_path(state.settings.under_home(adapter), "adapter")
        entry = resolve_model(state.matrix, state.settings, adapter_base(path))
    else:
        path, entry = None, resolve_model(state.matrix, state.settings, model)
    target = Target(
        base_path=getattr(entry, "path", entry.id),
        base_id=entry.id,
        adapter_path=str(path) if path else None,
        trust_remote_code=entry.trust_remote_code,
        sparse=bool(path and (path / "sparse_config.json").exists()),
    )
    return SampleSource(base_model=entry.id, adapter_path=target.adapter_path), target


def register(mcp: MCPServer) -> None:
    add_tool(mcp, sample, "Sample", ToolAnnotations(read_only_hint=True, idempotent_hint=False, open_world_hint=False))
