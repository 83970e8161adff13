"""datasets (list and inspect training data) and save_dataset (write rows an agent composed)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field

from llm_mcp.core.data import FILE_KINDS, DataError, row_format, row_warnings, validate_dataset
from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.validate import DEFAULTS
from llm_mcp.tools.common import READ_ONLY, add_tool, choice, result, state_of

MAX_LISTED = 200
MAX_SAVE_ROWS = 10_000
MAX_SAVE_BYTES = 16 << 20  # per call
MAX_FILE_BYTES = 1 << 30  # a dataset grown by appends
MAX_INSPECT_ROWS = 20_000
NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")


class DatasetFile(BaseModel):
    path: str = Field(description="Pass this as start_finetune(dataset=...): relative to LLM_MCP_HOME when under it.")
    absolute_path: str
    kind: str
    size_bytes: int
    modified: float


class TokenStats(BaseModel):
    model: str
    max_seq_len: int
    train_on: str
    rows_examined: int
    complete: bool
    tokens: int
    trained_tokens: int
    longest: int
    truncated: int
    dropped: int
    histogram: dict[str, int] = Field(description="Rows per token-length bucket.")


class DatasetsResult(BaseModel):
    home: str
    datasets: list[DatasetFile] = []
    path: str | None = None
    usable: bool | None = Field(None, description="False: start_finetune would refuse it (see problems).")
    rows: int | None = None
    complete: bool | None = Field(None, description="False: only the rows read within the time budget are counted.")
    formats: dict[str, int] = {}
    problems: list[str] = Field(default_factory=list, description="Bad rows with their line numbers.")
    warnings: list[str] = Field(default_factory=list, description="Rows that train, but maybe not as meant.")
    tokens: TokenStats | None = None
    preview: str | None = Field(None, description="One row as the model sees it; trained tokens inside [[ ]].")
    next_step: str


def _display(state, path: Path) -> str:
    home = state.settings.home.resolve()
    return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


def _listing(state) -> list[DatasetFile]:
    found: list[DatasetFile] = []
    roots = [state.settings.home / "data"] + [r for r in state.settings.roots[1:]]
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, files in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))[:50]
            if Path(dirpath).relative_to(root).parts.__len__() >= 3:
                dirnames[:] = []
            for name in sorted(files):
                p = Path(dirpath) / name
                if p.suffix.lower() in FILE_KINDS and not p.is_symlink() and p.is_file():
                    st = p.stat()
                    found.append(
                        DatasetFile(
                            path=_display(state, p.resolve()),
                            absolute_path=str(p.resolve()),
                            kind=FILE_KINDS[p.suffix.lower()],
                            size_bytes=st.st_size,
                            modified=st.st_mtime,
                        )
                    )
                if len(found) >= MAX_LISTED:
                    return found
    return found


def _inspect(
    state,
    path: Path,
    answer: DatasetsResult,
    model: str | None,
    max_seq_len: int | None,
    train_on: str,
    preview_row: int,
) -> None:
    try:
        summary = validate_dataset(path)
        answer.usable, answer.rows, answer.complete = True, summary.rows, summary.complete
        answer.formats, answer.warnings = summary.formats, summary.warnings
    except DataError as exc:
        answer.usable, answer.problems = False, exc.problems
        return
    if model is None:
        answer.next_step = (
            f"inspect token lengths with datasets(path={answer.path!r}, model=MODEL), or "
            f"start_finetune(model=MODEL, method='lora', dataset={answer.path!r}, dry_run=true)"
        )
        return
    entry = resolve_model(state.matrix, state.settings, model)
    seq = max_seq_len or min(DEFAULTS["max_seq_len"], entry.context_length)
    from llm_mcp.train.preview import first_rows, render_example, token_report, tokenizer_if_local

    tok = tokenizer_if_local(getattr(entry, "path", entry.id), entry.trust_remote_code)
    if tok is None:
        answer.warnings.append(f"the tokenizer of {entry.id} is not available locally: no token counts")
        return
    rows = first_rows(path, MAX_INSPECT_ROWS)
    report = token_report(tok, rows, seq, train_on)
    answer.tokens = TokenStats(
        model=entry.id,
        max_seq_len=seq,
        train_on=train_on,
        **{
            k: getattr(report, k)
            for k in (
                "rows_examined",
                "complete",
                "tokens",
                "trained_tokens",
                "longest",
                "truncated",
                "dropped",
                "histogram",
            )
        },
    )
    answer.warnings += report.warnings()
    if 1 <= preview_row <= len(rows):
        answer.preview = render_example(tok, rows[preview_row - 1], seq, train_on)
    answer.next_step = (
        f"start_finetune(model={model!r}, method='lora', dataset={answer.path!r}, max_seq_len={seq}, dry_run=true)"
    )


async def datasets(
    ctx: Context,
    path: Annotated[
        str | None,
        Field(
            description="Inspect this dataset (relative to LLM_MCP_HOME, or absolute under "
            "an allowed root); omit to list the datasets here.",
            max_length=4096,
        ),
    ] = None,
    model: Annotated[
        str | None,
        Field(
            description="With path: count tokens with this model's tokenizer and chat "
            "template (a matrix id or local checkpoint).",
            max_length=4096,
        ),
    ] = None,
    max_seq_len: Annotated[
        int | None,
        Field(
            description="With model: the length to check truncation against "
            "(default 1024, capped at the model's context).",
            ge=8,
            le=1_048_576,
        ),
    ] = None,
    train_on: Annotated[choice("completion", "all"), Field(description="Which tokens the loss covers.")] = "completion",
    preview_row: Annotated[
        int, Field(description="Which row (1-based) to show rendered; 0 = none.", ge=0, le=1_000_000)
    ] = 1,
) -> Annotated[CallToolResult, DatasetsResult]:
    """List the datasets in LLM_MCP_HOME/data and the allowed roots, or inspect one: rows per
    format, bad rows with line numbers, suspicious rows (empty or unanswered turns, very long
    rows), and with a model: a token-length histogram, how many rows max_seq_len would truncate
    or drop, and one example rendered with the model's chat template, trained tokens in [[ ]].
    """
    state = state_of(ctx)
    home = state.settings.home
    answer = DatasetsResult(home=str(home), next_step="")
    if path is None:
        answer.datasets = await anyio.to_thread.run_sync(_listing, state)
        answer.next_step = (
            "inspect one with datasets(path=...), or write one with save_dataset(name=..., rows=[...])"
            if answer.datasets
            else f"no datasets yet: save_dataset(name=..., rows=[...]) writes one into {home / 'data'}"
        )
        text = (
            f"{len(answer.datasets)} dataset(s) under {home / 'data'} and the allowed roots:\n"
            + "\n".join(f"- {d.path} ({d.kind}, {d.size_bytes:,} bytes)" for d in answer.datasets)
            + f"\nnext: {answer.next_step}"
        )
        return result(text, answer)
    resolved = state.settings.check_path(state.settings.under_home(path), "path")
    answer.path = _display(state, resolved)
    await anyio.to_thread.run_sync(_inspect, state, resolved, answer, model, max_seq_len, train_on, preview_row)
    if not answer.usable:
        answer.next_step = "fix the rows listed in problems (or rewrite the file with save_dataset), then inspect again"
    return result(_summarize(answer), answer)


def _summarize(a: DatasetsResult) -> str:
    if not a.usable:
        return f"{a.path}: NOT usable:\n" + "\n".join(f"  - {p}" for p in a.problems) + f"\nnext: {a.next_step}"
    lines = [f"{a.path}: {a.rows} rows{'' if a.complete else ' (counted within the time budget)'}, formats {a.formats}"]
    if a.tokens:
        t = a.tokens
        lines.append(
            f"tokens ({t.model}, max_seq_len {t.max_seq_len}): {t.tokens:,} total, {t.trained_tokens:,} trained, "
            f"longest {t.longest}; truncated {t.truncated}, dropped {t.dropped}; lengths {t.histogram}"
        )
    lines += [f"warning: {w}" for w in a.warnings]
    if a.preview is not None:
        lines.append(f"row preview (trained tokens in [[ ]]):\n{a.preview}")
    lines.append(f"next: {a.next_step}")
    return "\n".join(lines)


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


def _encode_rows(rows: list[Any]) -> tuple[bytes, dict[str, int], list[str]]:
    """JSONL bytes for `rows`, their formats and warnings; every bad row raised together, by index."""
    if not rows:
        raise InvalidArgumentError("rows is empty; give at least one row")
    if len(rows) > MAX_SAVE_ROWS:
        raise InvalidArgumentError(
            f"rows has {len(rows)} rows; allowed: at most {MAX_SAVE_ROWS} per call. Save the "
            "rest with mode='append' in further calls"
        )
    problems, formats, flagged, lines = [], {}, {}, []
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


def _write(path: Path, data: bytes, mode: str) -> int:
    """Write or append `data`; an append that fails is cut back, so the file is as before. Returns the size."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InvalidArgumentError(f"{path} is a symlink or not a regular file; choose another name")
    exists = path.exists()
    if mode == "create" and exists:
        raise InvalidArgumentError(
            f"{path.name} already exists ({path.stat().st_size:,} bytes); it is not "
            "overwritten. Use mode='append' to add rows or mode='overwrite' to replace it, or "
            "choose another name"
        )
    if mode == "append" and not exists:
        raise InvalidArgumentError(f"{path.name} does not exist yet; use mode='create'")
    if mode == "append":
        before = path.stat().st_size
        if before + len(data) > MAX_FILE_BYTES:
            raise InvalidArgumentError(f"{path.name} would grow past {MAX_FILE_BYTES >> 30} GB; start a new dataset")
        with open(path, "rb") as fh:
            fh.seek(max(0, before - 1))
            needs_newline = before > 0 and fh.read(1) != b"\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, (b"\n" if needs_newline else b"") + data)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, before)
            raise
        finally:
            os.close(fd)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.stat().st_size


def _count_rows(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


async def save_dataset(
    ctx: Context,
    name: Annotated[
        str,
        Field(
            description="File name under LLM_MCP_HOME/data ('.jsonl' is added): letters, digits, '.', '_', '-'.",
            max_length=70,
        ),
    ],
    rows: Annotated[
        list[dict[str, Any]],
        Field(
            description="Rows in one format each: {'messages': [{'role': "
            "'user'|'assistant'|'system', 'content': ...}]}, "
            "{'prompt', 'completion'} or {'text'}; for "
            "objective='dpo' {'prompt', 'chosen', 'rejected'}."
        ),
    ],
    mode: Annotated[
        choice("create", "append", "overwrite"),
        Field(
            description="create (default; refuses an existing file), append (adds to one), overwrite (replaces one)."
        ),
    ] = "create",
) -> Annotated[CallToolResult, SaveDatasetResult]:
    """Save training rows you composed (for example from this conversation) as a JSONL dataset
    in LLM_MCP_HOME/data, validated like a training file: every bad row is reported by index
    and nothing is written. Up to 10,000 rows / 16 MB per call (append for more); an existing
    file is never replaced unless mode='overwrite'. Returns the path to pass to start_finetune.
    """
    state = state_of(ctx)
    stem = name[:-6] if name.endswith(".jsonl") else name
    if not NAME.fullmatch(stem):
        raise InvalidArgumentError(
            f"name={name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (e.g. 'support-chats')"
        )
    data, formats, warnings = _encode_rows(rows)
    data_dir = state.settings.home / "data"
    if data_dir.is_symlink():
        raise InvalidArgumentError(f"{data_dir} is a symlink; save_dataset writes only into a real directory there")
    path = data_dir / f"{stem}.jsonl"  # not resolved: _write refuses a symlink rather than writing through it
    state.settings.check_path(path, "name")
    size = await anyio.to_thread.run_sync(_write, path, data, mode)
    total = await anyio.to_thread.run_sync(_count_rows, path)
    shown = _display(state, path)
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
    add_tool(mcp, datasets, "Datasets", READ_ONLY)
    add_tool(
        mcp,
        save_dataset,
        "Save a dataset",
        ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False),
    )
