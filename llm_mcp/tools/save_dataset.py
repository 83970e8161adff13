"""save_dataset: write rows an agent composed as a JSONL dataset in LLM_MCP_HOME/data."""

from __future__ import annotations

import re
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult
from pydantic import BaseModel, Field

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.request import Request, choice
from llm_mcp.core.rowfile import count_rows, encode_rows, write_rows
from llm_mcp.tools.common import STARTS, add_tool, result, state_of

NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")


class SaveDatasetResult(BaseModel):
    path: str = Field(description="Pass this as start_finetune(dataset=...).")
    absolute_path: str
    mode: str
    rows_written: int
    total_rows: int
    size_bytes: int
    formats: dict[str, int]
    warnings: list[str] = []
    next_step: str


class SaveDatasetRequest(Request):
    name: str = Field(
        description="File name under LLM_MCP_HOME/data ('.jsonl' is added): letters, digits, '.', '_', '-'.",
        max_length=70,
    )
    rows: list[dict[str, Any]] = Field(
        description="Rows in one format each: {'messages': [{'role': 'user'|'assistant'|'system', 'content': ...}]}, "
        "{'prompt', 'completion'} or {'text'}; for objective='dpo' {'prompt', 'chosen', 'rejected'}."
    )
    mode: choice("create", "append", "overwrite") = Field(  # type: ignore[valid-type]
        "create",
        description="create (default; refuses an existing file), append (adds to one), overwrite (replaces one).",
    )


async def save_dataset(ctx: Context, request: SaveDatasetRequest) -> Annotated[CallToolResult, SaveDatasetResult]:
    """Save training rows you composed (for example from this conversation) as a JSONL dataset
    in LLM_MCP_HOME/data, validated like a training file: every bad row is reported by index
    and nothing is written. Up to 10,000 rows / 16 MB per call (append for more); an existing
    file is never replaced unless mode='overwrite'. Returns the path to pass to start_finetune.
    """
    state = state_of(ctx)
    name, rows, mode = request.name, request.rows, request.mode
    stem = name[:-6] if name.endswith(".jsonl") else name
    if not NAME.fullmatch(stem):
        raise InvalidArgumentError(
            f"name={name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (e.g. 'support-chats')"
        )
    data, formats, warnings = encode_rows(rows)
    data_dir = state.settings.home / "data"
    if data_dir.is_symlink():
        raise InvalidArgumentError(f"{data_dir} is a symlink; save_dataset writes only into a real directory there")
    path = data_dir / f"{stem}.jsonl"  # not resolved: write_rows refuses a symlink rather than writing through it
    state.settings.check_path(path, "name")
    size = await anyio.to_thread.run_sync(write_rows, path, data, mode)
    total = await anyio.to_thread.run_sync(count_rows, path)
    shown = state.settings.display(path)
    answer = SaveDatasetResult(
        path=shown,
        absolute_path=str(path),
        mode=mode,
        rows_written=len(rows),
        total_rows=total,
        size_bytes=size,
        formats=formats,
        warnings=warnings,
        next_step=f"start_finetune(model=MODEL, method='lora', dataset={shown!r}); "
        f"datasets(path={shown!r}, model=MODEL) shows token lengths first",
    )
    text = (
        f"{'Appended' if mode == 'append' else 'Saved'} {len(rows)} rows to {shown} ({total} rows, {size:,} bytes; "
        f"formats {formats})." + "".join(f"\nwarning: {w}" for w in warnings) + f"\nnext: {answer.next_step}"
    )
    return result(text, answer)


def register(mcp: MCPServer) -> None:
    add_tool(mcp, save_dataset, SaveDatasetRequest, "Save a dataset", STARTS)
