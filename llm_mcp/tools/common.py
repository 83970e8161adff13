"""What every tool module shares: services from the lifespan context, registering a tool from its request
model behind the error boundary, structured results with a text summary, and progress while blocking work runs.

The error boundary is the one place project errors become the SDK's `ToolError` (the only exception whose
message reaches the model in mcp 2.x); a failing disk or database becomes a clear message instead of the
SDK's masked "Error executing tool NAME".
"""

from __future__ import annotations

import errno
import inspect
import sqlite3
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import anyio
from mcp.server.elicitation import AcceptedElicitation, CancelledElicitation, ElicitationResult
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from llm_mcp.core.errors import LlmMcpError, PathNotAllowedError
from llm_mcp.core.folders import folder_of, not_offerable, remember, secret
from llm_mcp.core.request import Request, describe_errors

if TYPE_CHECKING:
    from llm_mcp.tools.services import AppState

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
STARTS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
CAUGHT = (LlmMcpError, OSError, sqlite3.Error)


def state_of(ctx: Context) -> AppState:
    """The process-wide services the server's lifespan yielded."""
    return cast("AppState", ctx.request_context.lifespan_context)


def add_tool(
    mcp: MCPServer, handler: Callable, request: type[Request], title: str, annotations: ToolAnnotations
) -> None:
    """Register `handler(ctx, request)` as the tool named after it, its arguments `request`'s fields.

    The tool's description is the handler's docstring; its input schema is the request model's (bounds and
    choices included). The SDK checks only that the required arguments are there and of the right JSON
    shape; `Request.parse` checks the rest, and errors pass the error boundary (`_convert`).
    """
    name = handler.__name__
    hints = typing.get_type_hints(handler, include_extras=True)
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)]
    annotations_: dict[str, Any] = {"ctx": Context, "return": hints["return"]}
    for field, loose, default, description in request.tool_parameters():
        annotation = Annotated[loose, Field(description=description)]  # type: ignore[valid-type]
        value = inspect.Parameter.empty if default is ... else default
        params.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation))
        annotations_[field] = annotation
    if request.path_fields:  # a path outside the allowed roots: ask the user to allow its folder (MCP elicitation)
        access = Annotated[ElicitationResult[AllowFolder], Resolve(_asker(name, request.path_fields))]
        params.append(inspect.Parameter(ACCESS, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=access))
        annotations_[ACCESS] = access

    def prepare(ctx: Context, kwargs: dict[str, Any]) -> Request:
        answer = kwargs.pop(ACCESS, None)
        if answer is not None:
            _record_answer(state_of(ctx).settings, name, answer, [kwargs.get(f) for f in request.path_fields])
        return request.parse(kwargs, name)

    if inspect.iscoroutinefunction(handler):

        async def tool(ctx: Context, **kwargs: Any) -> Any:
            try:
                return await handler(ctx, prepare(ctx, kwargs))
            except CAUGHT as exc:
                raise _convert(name, exc, ctx) from exc
    else:

        def tool(ctx: Context, **kwargs: Any) -> Any:  # type: ignore[misc]
            try:
                return handler(ctx, prepare(ctx, kwargs))
            except CAUGHT as exc:
                raise _convert(name, exc, ctx) from exc

    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = handler.__doc__
    tool.__signature__ = inspect.Signature(params, return_annotation=hints["return"])  # type: ignore[attr-defined]
    tool.__annotations__ = annotations_
    mcp.add_tool(tool, title=title, description=inspect.cleandoc(handler.__doc__ or ""), annotations=annotations)
    schema = request.model_json_schema()
    schema.pop("title", None)
    schema.pop("description", None)
    _tool(mcp, name).parameters = schema


ACCESS = "folder_access"


class AllowFolder(BaseModel):
    """What the user answers when a tool needs a folder outside the allowed roots."""

    allow: bool = Field(description="Allow llm_mcp to read the files in this folder (remembered).")


def folder_to_ask(settings: Any, value: Any) -> Path | None:
    """The folder to ask the user about for a path argument: outside every allowed root, existing, and one that
    may be allowed at all; else None (nothing to ask)."""
    if not isinstance(value, str) or not value or value.startswith("hf:") or "\x00" in value:
        return None
    path = settings.under_home(value)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return None
    if not resolved.exists() or secret(resolved) or any(resolved.is_relative_to(r) for r in settings.roots):
        return None
    folder = folder_of(resolved)
    return None if not_offerable(folder, settings.home) else folder


def _asker(tool: str, fields: tuple[str, ...]) -> Callable:
    """The resolver that asks once for the first path argument whose folder is not allowed yet (clients that
    cannot be asked get nothing asked: the tool then refuses with the configuration line instead)."""

    def ask(ctx: Context, **values: Any) -> Any:
        caps = ctx.client_capabilities
        if caps is None or caps.elicitation is None:
            return None
        for value in values.values():
            folder = folder_to_ask(state_of(ctx).settings, value)
            if folder is not None:
                return Elicit(
                    f"{tool} wants to read {value}. Allow llm_mcp to read the files in {folder}? (Your answer is "
                    f"remembered in the state directory; credentials and system folders are never read.)",
                    AllowFolder,
                )
        return None

    kind = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(f, kind, default=None, annotation=str | None) for f in fields]
    ask.__signature__ = inspect.Signature([*params, inspect.Parameter("ctx", kind, annotation=Context)])  # type: ignore
    ask.__annotations__ = {**{f: str | None for f in fields}, "ctx": Context, "return": Any}
    return ask


def _record_answer(settings: Any, tool: str, answer: Any, values: list[Any]) -> None:
    """Remember a folder the user allowed; a refusal ends the call with the user's answer."""
    folder = next((f for v in values if (f := folder_to_ask(settings, v)) is not None), None)
    if folder is None:
        return
    if isinstance(answer, AcceptedElicitation) and answer.data is not None and answer.data.allow:
        remember(settings.home, folder)
    elif isinstance(answer, CancelledElicitation):
        raise PathNotAllowedError(
            f"{tool}: the user closed the question whether to allow reading {folder} without answering; nothing was "
            "read. Next: ask the user, then call again (the question comes again)"
        )
    elif not isinstance(answer, AcceptedElicitation) or answer.data is not None:
        raise PathNotAllowedError(
            f"{tool}: the user did not allow reading {folder}; nothing was read. Next: use data under the allowed "
            f"roots ({', '.join(str(r) for r in settings.roots)}), or ask the user to copy it there"
        )


def _tool(mcp: MCPServer, name: str) -> Any:
    tool = mcp._tool_manager.get_tool(name)
    assert tool is not None, f"tool {name} was just registered"
    return tool


def result(text: str, model: BaseModel) -> CallToolResult:
    """A tool result: a text summary for the model plus the structured content."""
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=model.model_dump(mode="json", exclude_none=True),
    )


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _explain(name: str, exc: BaseException, home: Path | None) -> str:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return (
            f"{name}: the job store ({home}/jobs.db) stayed locked by another process longer than the wait for it "
            "(a long write, or a stuck process holding it); call again in a few seconds. Jobs keep running."
        )
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


def _convert(name: str, exc: BaseException, ctx: Context) -> ToolError:
    if isinstance(exc, LlmMcpError):
        return ToolError(str(exc))
    return ToolError(_explain(name, exc, state_of(ctx).settings.home))


def explain_arguments(tool: str, schema: dict[str, Any], exc: ValidationError) -> str:
    """The SDK's argument validation error in the project's style: field, bad value, allowed values, next step."""
    problems = describe_errors(schema, exc)
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
        except Exception as exc:  # re-raised below, outside the task group's ExceptionGroup
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
