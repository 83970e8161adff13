"""Writing rows an agent composed to a JSONL dataset: encode and check them, then create, append or overwrite.

Every write is all or nothing (llm_mcp.core.atomic): a new or replaced file is written under a temporary name
and moved into place (a new one only if nothing is there yet); an append that fails is cut back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_mcp.core import atomic
from llm_mcp.core.atomic import check_room
from llm_mcp.core.data import row_format, row_warnings
from llm_mcp.core.errors import InvalidArgumentError

MAX_SAVE_ROWS = 10_000
MAX_SAVE_BYTES = 16 << 20  # per call
MAX_FILE_BYTES = 1 << 30  # a dataset grown by appends


def encode_rows(rows: list[Any]) -> tuple[bytes, dict[str, int], list[str]]:
    """JSONL bytes for `rows`, their formats and warnings; every bad row raised together, by index."""
    if not rows:
        raise InvalidArgumentError("rows is empty; give at least one row")
    if len(rows) > MAX_SAVE_ROWS:
        raise InvalidArgumentError(
            f"rows has {len(rows)} rows; allowed: at most {MAX_SAVE_ROWS} per call. Save the "
            "rest with mode='append' in further calls"
        )
    problems: list[str] = []
    formats: dict[str, int] = {}
    flagged: dict[str, list[int]] = {}
    lines: list[str] = []
    for i, row in enumerate(rows):
        try:
            fmt = row_format(row)
        except ValueError as exc:
            problems.append(f"rows[{i}]: {exc}")
            continue
        formats[fmt] = formats.get(fmt, 0) + 1
        for reason in row_warnings(row):
            flagged.setdefault(reason, []).append(i)
        lines.append(json.dumps(row, ensure_ascii=False))
    if problems:
        shown = problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise InvalidArgumentError(
            [
                f"{len(problems)} of {len(rows)} rows are bad; nothing was written. Each row "
                "needs 'messages' [{role, content}], 'prompt'+'completion' or 'text'"
            ]
            + shown
        )
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if len(data) > MAX_SAVE_BYTES:
        raise InvalidArgumentError(
            f"rows are {len(data) >> 20} MB as JSONL; allowed: {MAX_SAVE_BYTES >> 20} MB per "
            "call. Send them in parts with mode='append'"
        )
    warnings = [f"{len(idx)} row(s) {reason} (rows {idx[:5]})" for reason, idx in flagged.items()]
    return data, formats, warnings


def write_rows(path: Path, data: bytes, mode: str) -> int:
    """Create, overwrite or append to `path` with `data`, all of it or nothing (llm_mcp.core.atomic): a file
    someone else creates at the same moment is never replaced, an append that fails is cut back. Returns the
    file's size."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InvalidArgumentError(f"{path} is a symlink or not a regular file; choose another name")
    if mode == "append":
        if not path.exists():
            raise InvalidArgumentError(f"{path.name} does not exist yet; use mode='create'")
        if path.stat().st_size + len(data) > MAX_FILE_BYTES:
            raise InvalidArgumentError(f"{path.name} would grow past {MAX_FILE_BYTES >> 30} GB; start a new dataset")
        check_room(path, len(data))
        return atomic.append(path, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_room(path, len(data))
    if mode == "overwrite":
        atomic.replace(path, data)
        return path.stat().st_size
    try:
        atomic.create_new(path, data)
    except FileExistsError:
        raise InvalidArgumentError(
            f"{path.name} already exists ({path.stat().st_size:,} bytes); it is not overwritten. Use mode='append' to "
            "add rows or mode='overwrite' to replace it, or choose another name"
        ) from None
    return path.stat().st_size


def count_rows(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
