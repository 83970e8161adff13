"""What every tool module shares: services from the lifespan context, the error boundary,
structured results with a text summary, progress while blocking work runs, and the summaries.

The error boundary is the one place project errors become the SDK's `ToolError` (the only
exception whose message reaches the model in mcp 2.x); a failing disk or database becomes a
clear message instead of the SDK's masked "Error executing tool NAME".
"""

from __future__ import annotations

import errno
import functools
import inspect
import shlex
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, BeforeValidator, ValidationError

from llm_mcp.core.errors import LlmMcpError

if TYPE_CHECKING:
    from llm_mcp.inference.export import ExportResult
    from llm_mcp.inference.serving import ServeResult
    from llm_mcp.tools.finetune import StartFinetuneResult
    from llm_mcp.tools.sampling import SampleResult
    from llm_mcp.tools.services import AppState

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False)


def lower_case(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def choice(*values: str) -> Any:
    """An enum argument that also accepts other letter cases ('LoRA' for 'lora'): the schema lists `values`."""
    return Annotated[Literal[values], BeforeValidator(lower_case)]


def state_of(ctx: Context) -> AppState:
    """The process-wide services the server's lifespan yielded."""
    return ctx.request_context.lifespan_context


def add_tool(mcp: MCPServer, fn: Callable, title: str, annotations: ToolAnnotations) -> None:
    """Register `fn` behind the error boundary; its dedented docstring is the description the model reads."""
    mcp.add_tool(tool_errors(fn), title=title, description=inspect.cleandoc(fn.__doc__ or ""), annotations=annotations)


def result(text: str, model: BaseModel) -> CallToolResult:
    """A tool result: a text summary for the model plus the structured content."""
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=model.model_dump(mode="json", exclude_none=True),
    )


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _explain(name: str, exc: BaseException, home: Path | None) -> str:
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    path = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno not in STORAGE_ERRNOS:
        return (
            f"{name}: a path is not usable ({cause}); check the paths you passed (each name at most 255 "
            "characters, no special files), then call again."
        )
    if path and home is not None and not Path(path).resolve().is_relative_to(home.resolve()):
        return (
            f"{name} could not read or write {str(path)!r}: {cause}. Check that it exists and is readable, "
            "then call again."
        )
    where = f" ({path})" if path else ""
    return (
        f"{name} could not read or write the state directory {str(home)!r}{where}: {cause}. Free disk space or "
        "point LLM_MCP_HOME at a writable directory, then call again; existing jobs and adapters are untouched."
    )


def _convert(name: str, exc: BaseException, kwargs: dict) -> ToolError:
    if isinstance(exc, LlmMcpError):
        return ToolError(str(exc))
    ctx = next((v for v in kwargs.values() if isinstance(v, Context)), None)
    home = state_of(ctx).settings.home if ctx is not None else None
    return ToolError(_explain(name, exc, home))


def tool_errors(fn: Callable) -> Callable:
    """The error boundary: project errors and disk / database failures become clear ToolErrors."""
    caught = (LlmMcpError, OSError, sqlite3.Error)
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except caught as exc:
                raise _convert(fn.__name__, exc, kwargs) from exc
    else:

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except caught as exc:
                raise _convert(fn.__name__, exc, kwargs) from exc

    return wrapper


def _allowed(prop: dict[str, Any]) -> str:
    """What a JSON-schema property accepts, in words."""
    options = [prop, *prop.get("anyOf", [])]
    enums = [v for o in options for v in o.get("enum", [])]
    if enums:
        return f"one of {enums}"
    for o in options:
        lo = o.get("minimum", o.get("exclusiveMinimum"))
        hi = o.get("maximum", o.get("exclusiveMaximum"))
        if lo is not None or hi is not None:
            return f"a {o.get('type', 'number')} from {lo if lo is not None else '-inf'} to {hi if hi is not None else 'inf'}"
        if "maxLength" in o:
            return f"a string of at most {o['maxLength']} characters"
    types = [o["type"] for o in options if "type" in o and o["type"] != "null"]
    return " or ".join(types) or "see the tool's schema"


def explain_arguments(tool: str, schema: dict[str, Any], exc: ValidationError) -> str:
    """The SDK's argument validation error in the project's style: field, bad value, allowed values, next step."""
    props = schema.get("properties", {})
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or "(arguments)"
        allowed = _allowed(props.get(loc[0], {})) if loc else "an object"
        if err["type"] == "missing":
            desc = props.get(loc[0], {}).get("description", "") if loc else ""
            problems.append(f"{field} is required ({allowed}){': ' + desc if desc else ''}")
        else:
            problems.append(
                f"{field}={err.get('input')!r:.200} is not allowed: {err['msg'].lower()}; allowed: {allowed}"
            )
    head = (
        problems[0]
        if len(problems) == 1
        else f"{len(problems)} problems with the arguments:\n" + "\n".join(f"  - {p}" for p in problems)
    )
    return f"{head}\nFix the argument{'s' if len(problems) > 1 else ''} and call {tool} again."


async def with_progress(ctx: Context, fn, *args, message: Callable[[], str], cancel: threading.Event | None = None):
    """Run a blocking call in a worker thread, sending a progress notification every second.

    If the caller goes away (the request is cancelled, the client disconnects), the call returns at once and
    `cancel` is set, so work that watches it (generation) stops instead of running on for nobody.
    """
    done = anyio.Event()
    box: dict = {}

    async def worker():
        try:
            box["value"] = await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=cancel is not None)
        except Exception as exc:
            box["error"] = exc
        finally:
            done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            seconds = 0
            while not done.is_set():
                with anyio.move_on_after(1):
                    await done.wait()
                if not done.is_set():
                    seconds += 1
                    await ctx.report_progress(seconds, None, f"{message()} ({seconds} s)")
    finally:
        if cancel is not None:
            cancel.set()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _objective_note(c: dict) -> str:
    note = f" DPO (beta {c['dpo']['beta']:g})" if c.get("objective") == "dpo" else ""
    return note + (f" from {c['init_from']}'s adapter" if c.get("init_from") else "")


def summarize_start(r: StartFinetuneResult) -> str:
    c, e = r.config, r.estimates
    lines = [
        ("DRY RUN (nothing started): " if r.dry_run else f"Started job {r.job_id} ({r.state}): ")
        + f"{c['method']}{_objective_note(c)} on {c['model']['id']}, lr {c['learning_rate']:g}, rank {c['lora']['rank']}, "
        f"batch {c['batch_size']}x{c['gradient_accumulation']}x{c['num_processes']}, max_seq_len {c['max_seq_len']}.",
        f"{e['train_rows']} training rows ({e['eval_rows']} eval), {e['total_steps']} steps, ~{e['approx_tokens']:,} "
        f"tokens; {e['trainable_params']:,} trainable params; memory ~{e['memory_gb']:g} GB of "
        f"{e['usable_memory_gb']:g} GB usable; rough time {e['rough_time_s']:.0f} s.",
    ]
    lines += [f"warning: {w}" for w in r.warnings]
    sub = r.submission
    if sub and sub.get("kind") == "sbatch":
        lines.append(f"would run `{shlex.join(sub['command'])}` with this script:\n{sub['script']}")
    elif sub:
        lines.append(
            f"would submit to Ray at {sub['address']}: {sub['entrypoint']} "
            f"(CPUs {sub['entrypoint_num_cpus']}, GPUs {sub['entrypoint_num_gpus']})"
        )
    lines.append(f"next: {r.next_step}")
    return "\n".join(lines)


def summarize_sample(r: SampleResult) -> str:
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


def summarize_export(r: ExportResult) -> str:
    if r.state == "running":
        return f"Merging {r.job_id} ({r.checkpoint}) into {r.destination}: still running. " + " ".join(r.notes)
    lines = [
        f"{'Already exported' if r.reused else 'Exported'} {r.job_id} ({r.checkpoint}) as {r.format}: {r.destination}"
    ]
    lines += [f"  {Path(f.path).name}  {f.size:,} bytes  sha256 {f.sha256[:16]}..." for f in r.files[:12]]
    lines += [f"{k}: {v}" for k, v in r.snippets.items()]
    lines += r.notes
    return "\n".join(lines)


def summarize_serve(r: ServeResult) -> str:
    if r.state != "ready":
        return f"{r.job_id} ({r.checkpoint}): {r.state}. " + " ".join(r.notes)
    lines = [f"Serving {r.job_id} ({r.checkpoint}) as {r.served_as} model {r.model!r} at {r.url}"]
    lines += [f"check: {k} = {v}" for k, v in r.verification.items()]
    lines += r.notes + [f"curl: {r.example_curl}"]
    return "\n".join(lines)
