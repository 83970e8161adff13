"""Training data: find, stream, validate and read rows of JSONL / JSON / CSV / Parquet files
or a `datasets` directory saved with save_to_disk.

Each row is one of these formats, detected per row:
  messages            {"messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...], "tools"?}:
                      OpenAI's chat shape, with assistant tool_calls, tool results and reasoning
                      (llm_mcp.core.rows.check_messages)
  sharegpt, alpaca    the two common instruction shapes (llm_mcp.core.formats), read as conversations
  prompt_completion   {"prompt": "...", "completion": "..."}
  text                {"text": "..."}
  prompt              (objective grpo) {"prompt": "..." or a message list, any reference fields the graders read}
  preference          (objective dpo) {"prompt", "chosen", "rejected"}, each a string or a message list;
                      {"chosen": [messages], "rejected": [messages]} (the shared turns are the prompt); or
                      {"input": {"messages": [...]}, "preferred_output": [assistant message],
                       "non_preferred_output": [assistant message]}
Any other shape trains through a `columns` mapping (llm_mcp.core.formats.apply_columns). Validation streams
the file (a 1 GB JSONL is never read into memory), stops after a time budget, and reports the first bad rows
with their line numbers.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import DataError
from llm_mcp.core.formats import alpaca_messages, apply_columns, guess_columns, sharegpt_messages
from llm_mcp.core.hub_datasets import HubRef, HubRows
from llm_mcp.core.objectives import get_objective
from llm_mcp.core.readers import Source, _Bad, file_kind, iter_rows
from llm_mcp.core.rows import (
    FIELDS,
    PREFERENCE_KEYS,
    check_messages,
    check_no_images,
    check_tools,
    found_instead,
    preference_pair,
    prompt_row,
)

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "prompt")
MAX_BAD_ROWS_SHOWN = 5
LONG_ROW_CHARS = 100_000  # ~25k tokens: longer than any context a job here trains on; it will be truncated


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
    source: Any = field(default=None, repr=False, compare=False)  # the Path or HubRows validated

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
        fields = {k: v for k, v in asdict(self).items() if k != "source"}
        return {**fields, "approx_tokens": self.approx_tokens, "warnings": self.warnings}


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
    if "prompt" in row and "completion" not in row:
        return "prompt", prompt_row(row)
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


def check_objective(fmt: str, objective: str | None) -> None:
    """A row fits the job's objective (llm_mcp.core.objectives): its format is one the objective trains on."""
    if objective is None:
        return
    refusal = get_objective(objective).refuse_row(fmt)
    if refusal:
        raise ValueError(refusal)


def validate_dataset(
    path: Source,
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
    if isinstance(path, HubRows):
        pass
    elif not path.exists():
        raise DataError(f"{field_name}={str(path)!r} does not exist")
    elif not (path.is_file() or path.is_dir()):
        raise DataError(f"{field_name}={str(path)!r} is not a regular file or a dataset directory")
    kind = file_kind(path, field_name)
    summary = DatasetSummary(path=str(path), kind=kind, source=path)
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
        raise DataError(f"{field_name}={str(path)!r} cannot be read: {exc.strerror or exc}") from exc
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
        prompt = row["prompt"]
        text = prompt if isinstance(prompt, str) else "".join(str(m.get("content", "")) for m in prompt)
        return len(text) + len(row.get("completion", ""))
    return len(row.get("text", ""))


def canonical_rows(path: Source, columns: Mapping[Any, str] | None = None) -> Iterator[tuple[str, dict[str, Any], Any]]:
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


def load_rows(path: Source, columns: Mapping[Any, str] | None = None) -> list[dict[str, Any]]:
    """All rows, normalized (the trainer's view). Raises DataError on the first bad row."""
    return [row for _, row, _ in canonical_rows(path, columns)]


def source_of(dataset: str, hub: HubRef | None) -> Source:
    """What a job config's dataset names: the pinned Hub dataset, or the file."""
    return HubRows(hub) if hub is not None else Path(dataset)


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
