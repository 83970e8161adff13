"""Training data: find, stream, validate and read rows of JSONL / JSON / CSV / Parquet files
or a `datasets` directory saved with save_to_disk.

Each row is one of these formats, detected per row:
  messages            {"messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...], "tools"?}:
                      OpenAI's chat shape, with assistant tool_calls, tool results and reasoning
                      (llm_mcp.core.rows.check_messages)
  sharegpt, alpaca    the two common instruction shapes (llm_mcp.core.formats), read as conversations
  prompt_completion   {"prompt": "...", "completion": "..."}
  text                {"text": "..."}
  preference          (objective dpo) {"prompt", "chosen", "rejected"}, each a string or a message list;
                      {"chosen": [messages], "rejected": [messages]} (the shared turns are the prompt); or
                      {"input": {"messages": [...]}, "preferred_output": [assistant message],
                       "non_preferred_output": [assistant message]}
Any other shape trains through a `columns` mapping (llm_mcp.core.formats.apply_columns). Validation streams
the file (a 1 GB JSONL is never read into memory), stops after a time budget, and reports the first bad rows
with their line numbers.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.formats import alpaca_messages, apply_columns, guess_columns, sharegpt_messages
from llm_mcp.core.objectives import get_objective
from llm_mcp.core.rows import (
    FIELDS,
    PREFERENCE_KEYS,
    check_messages,
    check_no_images,
    check_tools,
    found_instead,
    preference_pair,
)

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference")
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_BAD_ROWS_SHOWN = 5
MAX_LINE_BYTES = 16 << 20  # one JSONL row; longer lines are reported, never held in memory
MAX_JSON_BYTES = 256 << 20  # .json is parsed whole; bigger files must be JSONL
LONG_ROW_CHARS = 100_000  # ~25k tokens: longer than any context a job here trains on; it will be truncated
csv.field_size_limit(64 * 1024 * 1024)


class DataError(InvalidArgumentError):
    """The dataset cannot be used: unreadable, unknown format, or bad rows (with line numbers)."""


@dataclass
class DatasetSummary:
    path: str
    kind: str
    rows: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    chars: int = 0
    complete: bool = True
    bad_rows: list[str] = field(default_factory=list)
    bad_row_count: int = 0
    suspicious: dict[str, list[str]] = field(default_factory=dict)  # reason -> locations (all counted, 3 kept)
    suspicious_counts: dict[str, int] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """Rows that train, but perhaps not as meant: one line per reason, with a count and example locations."""
        return [
            f"{self.suspicious_counts[reason]} row(s) {reason} ({', '.join(where)}"
            + (", ..." if self.suspicious_counts[reason] > len(where) else "")
            + ")"
            for reason, where in self.suspicious.items()
        ]

    def flag(self, reason: str, where: str) -> None:
        self.suspicious_counts[reason] = self.suspicious_counts.get(reason, 0) + 1
        kept = self.suspicious.setdefault(reason, [])
        if len(kept) < 3:
            kept.append(where)

    @property
    def approx_tokens(self) -> int:
        return self.chars // 4

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "approx_tokens": self.approx_tokens, "warnings": self.warnings}


def file_kind(path: Path, field_name: str = "dataset") -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets_dir"
        raise DataError(
            f"{field_name}={str(path)!r} is a directory but not a dataset saved with save_to_disk "
            "(no dataset_info.json / dataset_dict.json); pass a .jsonl, .json, .csv or .parquet file"
        )
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{field_name}={str(path)!r} has extension {path.suffix!r}; allowed: {sorted(FILE_KINDS)} or a "
            "datasets directory (save_to_disk). Rename or convert the file."
        )
    return kind


def parse_row(row: Any) -> tuple[str, dict[str, Any]]:
    """(the row's format, the row as training reads it). Raises ValueError with what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    check_no_images(row)
    if any(k in row for k in PREFERENCE_KEYS):
        return "preference", preference_pair(row)
    if "messages" in row:
        out: dict[str, Any] = {"messages": check_messages(row["messages"])}
        if row.get("tools"):
            out["tools"] = check_tools(row["tools"])
        return "messages", _trainable(out)
    if "conversations" in row:
        return "sharegpt", _trainable(sharegpt_messages(row))
    if "instruction" in row:
        return "alpaca", alpaca_messages(row)
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise ValueError(f"missing {key!r}{found_instead(row, key)} (prompt_completion rows need both)")
            if not isinstance(row[key], str):
                raise ValueError(f"{key!r} must be a string, got {type(row[key]).__name__}")
        if not row["completion"]:
            raise ValueError("'completion' is empty")
        return "prompt_completion", {"prompt": row["prompt"], "completion": row["completion"]}
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        return "text", {"text": row["text"]}
    raise ValueError(unknown_shape(row))


def _trainable(row: dict[str, Any]) -> dict[str, Any]:
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise ValueError("no assistant message: nothing to learn from")
    return row


def unknown_shape(row: dict[str, Any]) -> str:
    """Why a row has no known format, with the likeliest fix: a typo'd key, or a `columns` mapping."""
    keys = sorted(row)[:8]
    typos = [f"{k!r} for {close[0]!r}" for k in keys if (close := difflib.get_close_matches(k, FIELDS, 1, 0.85))]
    guess = guess_columns(list(row))
    hint = f"; did you mean {', '.join(typos)}?" if typos else ""
    if not typos and guess:
        hint = f"; map your columns, e.g. columns={guess}"
    elif not typos:
        hint = "; map your columns to prompt / completion (or messages, text), e.g. columns={'prompt': 'question', ...}"
    return (
        f"no known format (found keys {keys}): rows need 'messages', 'prompt'+'completion', 'text', Alpaca's "
        f"'instruction'+'output' or ShareGPT's 'conversations'{hint}"
    )


def row_format(row: Any) -> str:
    """Detect a row's format; raise ValueError with what is wrong."""
    return parse_row(row)[0]


def row_warnings(row: dict[str, Any]) -> list[str]:
    """Reasons a valid row may not train as meant (reported as warnings, never refused)."""
    out = []
    if _row_chars(row) > LONG_ROW_CHARS:
        out.append(f"are over {LONG_ROW_CHARS:,} characters (they will be truncated to max_seq_len)")
    if "messages" in row and isinstance(row["messages"], list) and row["messages"][-1]["role"] != "assistant":
        out.append("end on a user or system turn (that last turn is context only, not trained on)")
    return out


def normalize(row: dict[str, Any]) -> dict[str, Any]:
    """The row as training reads it: a conversation (with its tools), prompt + completion, text or a pair."""
    return parse_row(row)[1]


def iter_rows(path: Path, kind: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) — location is 'line N' or 'row N' — streaming where the format allows."""
    kind = kind or file_kind(path)
    if kind == "jsonl":
        with open(path, "rb") as fh:
            lineno = 0
            while raw := fh.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                where = f"line {lineno}"
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while (chunk := fh.readline(1 << 20)) and not chunk.endswith(b"\n"):
                        pass  # skip the rest of the line without holding it in memory
                    yield (
                        where,
                        _Bad(
                            f"line longer than {MAX_LINE_BYTES >> 20} MB (is this a binary file, or "
                            "JSON without newlines?); one row per line"
                        ),
                    )
                    continue
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield where, _Bad("not UTF-8 text (is this a binary file?)")
                    continue
                try:
                    yield where, json.loads(text)
                except json.JSONDecodeError as exc:
                    yield where, _Bad(f"invalid JSON ({exc.msg} at column {exc.colno})")
                except ValueError as exc:  # e.g. a number too long to convert
                    yield where, _Bad(f"invalid JSON ({exc})")
    elif kind == "json":
        if path.stat().st_size > MAX_JSON_BYTES:
            raise DataError(
                f"dataset={str(path)!r} is a {path.stat().st_size >> 20} MB .json file; .json is read whole, "
                f"so the limit is {MAX_JSON_BYTES >> 20} MB. Convert it to JSONL (one row per line), "
                "which is streamed"
            )
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(
                f"dataset={str(path)!r} is not valid JSON ({exc}); use a JSON list of rows or JSONL"
            ) from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"dataset={str(path)!r}: a .json dataset must be a list of rows (or {{'data': [...]}})")
        for i, row in enumerate(data, 1):
            yield f"row {i}", row
    elif kind == "csv":
        csv.field_size_limit(MAX_LINE_BYTES)  # a row's fields are bounded like a JSONL line
        with open(path, newline="", encoding="utf-8", errors="strict") as fh:
            i = 1
            try:
                for i, row in enumerate(csv.DictReader(fh), 2):
                    yield f"line {i}", row
            except UnicodeDecodeError:
                raise DataError(f"dataset={str(path)!r} is not UTF-8 text") from None
            except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
                raise DataError(f"dataset={str(path)!r} line {i + 1}: malformed CSV ({exc})") from None
    elif kind == "parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    elif kind == "datasets_dir":
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for i, row in enumerate(ds, 1):
            yield f"row {i}", row


class _Bad:
    def __init__(self, reason: str):
        self.reason = reason


def check_objective(fmt: str, objective: str | None) -> None:
    """A row fits the job's objective (llm_mcp.core.objectives): its format is one the objective trains on."""
    if objective is None:
        return
    refusal = get_objective(objective).refuse_row(fmt)
    if refusal:
        raise ValueError(refusal)


def validate_dataset(
    path: Path,
    field_name: str = "dataset",
    time_budget_s: float = 3.0,
    objective: str | None = None,
    columns: Mapping[Any, str] | None = None,
) -> DatasetSummary:
    """Stream the dataset and check every row until the time budget runs out (and, given an
    objective, that each row is of a format it trains on); `columns` maps the rows' own keys first.

    Raises:
        DataError: unreadable / unknown kind / empty, or bad rows (first few, with line numbers).
    """
    if not path.exists():
        raise DataError(f"{field_name}={str(path)!r} does not exist")
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"{field_name}={str(path)!r} is not a regular file or a dataset directory")
    kind = file_kind(path, field_name)
    summary = DatasetSummary(path=str(path), kind=kind)
    formats: Counter[str] = Counter()
    deadline = time.monotonic() + time_budget_s
    try:
        for where, row in iter_rows(path, kind):
            try:
                if isinstance(row, _Bad):
                    raise ValueError(row.reason)
                fmt, canonical = parse_row(apply_columns(row, columns))
                check_objective(fmt, objective)
                for reason in row_warnings(canonical):
                    summary.flag(reason, where)
            except ValueError as exc:
                summary.bad_row_count += 1
                if len(summary.bad_rows) < MAX_BAD_ROWS_SHOWN:
                    summary.bad_rows.append(f"{where}: {exc}")
            else:
                formats[fmt] += 1
                summary.rows += 1
                summary.chars += _row_chars(canonical)
            if summary.rows % 256 == 0 and time.monotonic() > deadline:
                summary.complete = False
                break
    except OSError as exc:
        raise DataError(f"{field_name}={str(path)!r} cannot be read: {exc.strerror}") from exc
    summary.formats = dict(formats)
    if summary.bad_row_count:
        more = summary.bad_row_count - len(summary.bad_rows)
        raise DataError(
            [
                f"{field_name}: {summary.bad_row_count} bad row(s) in {path.name}"
                + (f" (first {len(summary.bad_rows)} shown, {more} more)" if more > 0 else "")
                + f"; each row needs {get_objective(objective).rows_hint}"
            ]
            + [f"{field_name} {b}" for b in summary.bad_rows]
        )
    if summary.rows == 0:
        raise DataError(
            f"{field_name}={str(path)!r} has no rows; add training examples (JSONL: one JSON object per line)"
        )
    return summary


def _row_chars(row: dict[str, Any]) -> int:
    """Characters of a canonical row (about 4 per token)."""
    if "chosen" in row:
        return sum(len(m["content"]) for v in row.values() for m in ([{"content": v}] if isinstance(v, str) else v))
    if "messages" in row:
        return sum(
            len(m["content"]) + len(m.get("reasoning_content", "")) + len(json.dumps(m.get("tool_calls", "")))
            for m in row["messages"]
        ) + len(json.dumps(row.get("tools", "")))
    if "prompt" in row:
        return len(row["prompt"]) + len(row["completion"])
    return len(row.get("text", ""))


def canonical_rows(path: Path, columns: Mapping[Any, str] | None = None) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(location, the row as training reads it, the raw row) for every row, streamed.

    Raises:
        DataError: the first bad row, with its location.
    """
    for where, row in iter_rows(path):
        try:
            if isinstance(row, _Bad):
                raise ValueError(row.reason)
            yield where, normalize(apply_columns(row, columns)), row
        except ValueError as exc:
            raise DataError(f"dataset {where}: {exc}") from None


def load_rows(path: Path, columns: Mapping[Any, str] | None = None) -> list[dict[str, Any]]:
    """All rows, normalized (the trainer's view). Raises DataError on the first bad row."""
    return [row for _, row, _ in canonical_rows(path, columns)]


def fingerprint(path: Path) -> dict[str, int]:
    """What identifies the validated file: device, inode, size and mtime (a replaced, edited or linked file differs)."""
    st = os.stat(path, follow_symlinks=False)
    return {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_fingerprint(path: Path, expected: dict[str, int] | None, field_name: str = "dataset") -> None:
    """The job trains on what was validated: refuse a file that changed since.

    Raises:
        DataError: the file is gone, was replaced (e.g. by a symlink elsewhere) or was modified.
    """
    if not expected:
        return
    try:
        now = fingerprint(path)
    except OSError as exc:
        raise DataError(f"{field_name} {path} is gone since it was validated ({exc.strerror})") from None
    if now != expected:
        raise DataError(
            f"{field_name} {path} changed after start_finetune validated it (replaced, edited or "
            "swapped for a link); start the job again so the new data is validated"
        )
