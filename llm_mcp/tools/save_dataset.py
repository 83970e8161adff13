"""save_dataset: rows an agent composed, or a user's file or Hub dataset imported, as JSONL in LLM_MCP_HOME/data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult
from pydantic import BaseModel, Field

from llm_mcp.core import importer
from llm_mcp.core.atomic import check_room
from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.hub_datasets import Revision, Split, Subset, cached_snapshot, is_hub_id, offline, repo_of
from llm_mcp.core.jobconfig import Columns
from llm_mcp.core.readers import file_kind
from llm_mcp.core.request import Request, choice
from llm_mcp.core.rowfile import count_rows, encode_rows, write_rows
from llm_mcp.tools.common import STARTS, add_tool, result, state_of
from llm_mcp.validation.sources import dataset_source

NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")


class SaveDatasetResult(BaseModel):
    state: str = Field(
        "done", description="'done'; or 'running': a large import goes on in the background (progress shows how far)."
    )
    path: str = Field(description="Pass this as start_finetune(dataset=...).")
    absolute_path: str
    mode: str
    source: str | None = Field(None, description="What was imported (a file, or a Hub dataset at its commit).")
    rows_written: int = 0
    total_rows: int = 0
    size_bytes: int = 0
    formats: dict[str, int] = {}
    skipped_rows: int = Field(0, description="skip_bad_rows: bad rows left out (the first are in `skipped`).")
    skipped: list[str] = []
    progress: dict[str, Any] | None = Field(None, description="A running import: rows so far, bytes, phase.")
    warnings: list[str] = []
    next_step: str


class SaveDatasetRequest(Request):
    path_fields: ClassVar[tuple[str, ...]] = ("source",)

    name: str = Field(
        description="File name under LLM_MCP_HOME/data ('.jsonl' is added): letters, digits, '.', '_', '-'.",
        max_length=70,
    )
    rows: list[dict[str, Any]] | None = Field(
        None,
        description="Rows you composed, in one format each: {'messages': [{'role', 'content'}, ...]}, "
        "{'prompt', 'completion'}, {'text'}, Alpaca or ShareGPT; for objective='dpo' {'prompt', 'chosen', "
        "'rejected'}; for objective='grpo' {'prompt', plus what its graders read, e.g. 'answer'}. Or give source "
        "instead.",
    )
    source: str | None = Field(
        None,
        description="Import instead: the user's file (JSONL / JSON / CSV / Parquet, any format datasets reads, or "
        "their own keys through columns) or a Hub dataset 'hf:ORG/NAME' (downloaded into the Hugging Face cache "
        "when it is not there). Streamed in the background; written as training reads it.",
        max_length=4096,
    )
    columns: Columns | None = Field(
        None, description="With source: its own keys by the names training knows, e.g. {'prompt': 'ticket'}."
    )
    subset: Subset = None
    split: Split = None
    revision: Revision = None
    skip_bad_rows: bool = Field(
        False, description="With source: leave bad rows out (listed) instead of refusing the import."
    )
    mode: choice("create", "append", "overwrite") = Field(  # type: ignore[valid-type]
        "create",
        description="create (default; refuses an existing file), append (adds to one), overwrite (replaces one).",
    )

    def check(self) -> list[str]:
        if (self.rows is None) == (self.source is None):
            return ["give rows (rows you composed) or source (a file or 'hf:ORG/NAME' to import), not both"]
        given = [k for k in ("columns", "subset", "split", "revision") if getattr(self, k) is not None]
        if self.rows is not None and (given or self.skip_bad_rows):
            return [f"{', '.join(given) or 'skip_bad_rows'}: only with source; rows are saved as given"]
        return []


async def save_dataset(ctx: Context, request: SaveDatasetRequest) -> Annotated[CallToolResult, SaveDatasetResult]:
    """Save training rows you composed (for example from this conversation), or import the user's
    file or a Hub dataset, as a JSONL dataset in LLM_MCP_HOME/data, validated like a training
    file. rows: every bad row is reported by index and nothing is written; up to 10,000 rows /
    16 MB per call (append for more). source: streamed in a background process (a 2 GB file
    never loads into the server), converted to the rows training reads, bad rows reported by
    line; a call waits up to 20 s, then reports progress (call again with the same arguments for
    the result). An existing file is never replaced unless mode='overwrite'. Returns the path to
    pass to start_finetune.
    """
    state = state_of(ctx)
    name, mode = request.name, request.mode
    stem = name[:-6] if name.endswith(".jsonl") else name
    if not NAME.fullmatch(stem):
        raise InvalidArgumentError(
            f"name={name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (e.g. 'support-chats')"
        )
    data_dir = state.settings.home / "data"
    if data_dir.is_symlink():
        raise InvalidArgumentError(f"{data_dir} is a symlink; save_dataset writes only into a real directory there")
    path = data_dir / f"{stem}.jsonl"  # not resolved: write_rows refuses a symlink rather than writing through it
    state.settings.check_path(path, "name")
    if request.source is not None:
        return await _import(state, request, path)
    rows = request.rows or []
    data, formats, warnings = encode_rows(rows)
    size = await anyio.to_thread.run_sync(write_rows, path, data, mode)
    total = await anyio.to_thread.run_sync(count_rows, path)
    answer = SaveDatasetResult(
        path=state.settings.display(path),
        absolute_path=str(path),
        mode=mode,
        rows_written=len(rows),
        total_rows=total,
        size_bytes=size,
        formats=formats,
        warnings=warnings,
        next_step="",
    )
    return _done(answer)


def _done(answer: SaveDatasetResult) -> CallToolResult:
    shown = answer.path
    answer.next_step = (
        f"start_finetune(model=MODEL, method='lora', dataset={shown!r}); "
        f"datasets(path={shown!r}, model=MODEL) shows token lengths first"
    )
    verb = "Imported" if answer.source else "Appended" if answer.mode == "append" else "Saved"
    text = (
        f"{verb} {answer.rows_written} rows"
        + (f" from {answer.source}" if answer.source else "")
        + f" to {shown} ({answer.total_rows} rows, {answer.size_bytes:,} bytes; formats {answer.formats})."
        + (f"\nskipped {answer.skipped_rows} bad row(s): {'; '.join(answer.skipped[:5])}" * bool(answer.skipped_rows))
        + "".join(f"\nwarning: {w}" for w in answer.warnings)
        + f"\nnext: {answer.next_step}"
    )
    return result(text, answer)


async def _import(state, request: SaveDatasetRequest, path: Path) -> CallToolResult:
    """Start (or rejoin) the background import of `request.source` into `path`, and wait for it a while."""
    settings, source = state.settings, request.source or ""
    hub = (request.subset, request.split, request.revision)
    spec: dict[str, Any] = {"dest": str(path), "mode": request.mode, "columns": request.columns}
    spec["skip_bad_rows"] = request.skip_bad_rows

    def identify() -> dict[str, Any]:
        if is_hub_id(source) and not offline() and cached_snapshot(repo_of(source, "source"), request.revision) is None:
            keys = ("subset", "split", "revision")
            return {"hub_id": {"repo": repo_of(source, "source"), **dict(zip(keys, hub))}}  # downloaded by the worker
        resolved = dataset_source(settings, source, "source", *hub)
        if isinstance(resolved, Path):
            file_kind(resolved, "source")
            check_room(path, resolved.stat().st_size if resolved.is_file() else 0)
        return importer.source_identity(resolved)

    try:
        spec.update(await anyio.to_thread.run_sync(identify))
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    spec["id"] = importer.spec_id(spec)
    report = await anyio.to_thread.run_sync(importer.read_report, path)
    same = report is not None and report.get("id") == spec["id"]
    if not (same and report and report.get("state") == "done"):
        if await anyio.to_thread.run_sync(importer.running, path):
            if not same:
                raise InvalidArgumentError(
                    f"another import into {path.name} is running; wait for it (save_dataset with its arguments shows "
                    "its progress) or choose another name"
                )
        else:
            if request.mode == "create" and path.exists():
                raise InvalidArgumentError(
                    f"{path.name} already exists ({path.stat().st_size:,} bytes); it is not overwritten. Use "
                    "mode='append' to add the rows or mode='overwrite' to replace it, or choose another name"
                )
            if request.mode == "append" and not path.exists():
                raise InvalidArgumentError(f"{path.name} does not exist yet; use mode='create'")
            await anyio.to_thread.run_sync(importer.start, spec, path)
        report = await anyio.to_thread.run_sync(importer.wait, path, spec["id"])
    shown = settings.display(path)
    answer = SaveDatasetResult(path=shown, absolute_path=str(path), mode=request.mode, next_step="")
    phase = report.get("state")
    if phase == "done":
        answer.source, answer.rows_written, answer.formats = report.get("source"), report["rows"], report["formats"]
        answer.skipped_rows, answer.skipped = report.get("bad_rows", 0), report.get("bad", [])
        answer.warnings = report.get("warnings", [])
        answer.total_rows = await anyio.to_thread.run_sync(count_rows, path)
        answer.size_bytes = path.stat().st_size
        return _done(answer)
    if phase == "refused":
        bad = report.get("bad", [])
        raise InvalidArgumentError(
            [
                f"source: {report.get('bad_rows', 0)} bad row(s) of {report.get('rows', 0) + report.get('bad_rows', 0)}"
                f" in {source}; nothing was written"
                + (f" ({report['error']})" if report.get("error") else "")
                + ". Next: map the rows' keys with columns={...}, fix the file, or pass skip_bad_rows=true to leave "
                "them out"
            ]
            + [f"source {b}" for b in bad]
        )
    if phase == "failed":
        raise InvalidArgumentError(f"source: the import of {source} into {path.name} failed: {report.get('error')}")
    answer.state = "running"
    answer.progress = {k: v for k, v in report.items() if k not in ("id", "bad")}
    answer.next_step = "save_dataset with the same arguments shows its progress, and the result once it is done"
    text = f"Importing {source} into {shown} in the background: {answer.progress}.\nnext: {answer.next_step}"
    return result(text, answer)


def register(mcp: MCPServer) -> None:
    add_tool(mcp, save_dataset, SaveDatasetRequest, "Save a dataset", STARTS)
