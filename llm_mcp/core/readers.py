"""Reading a dataset's raw rows, streamed: JSONL / JSON / CSV / Parquet files, a `datasets` directory saved with
save_to_disk, or a Hub dataset pinned to a commit (llm_mcp.core.hub_datasets). What the rows mean is
llm_mcp.core.data's business."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import DataError
from llm_mcp.core.hub_datasets import HubRows

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_LINE_BYTES = 16 << 20  # one JSONL row; longer lines are reported, never held in memory
MAX_JSON_BYTES = 256 << 20  # .json is parsed whole; bigger files must be JSONL
csv.field_size_limit(64 * 1024 * 1024)

Source = Path | HubRows  # a file or directory, or a Hub dataset pinned to a commit (llm_mcp.core.hub_datasets)


def file_kind(path: Source, field_name: str = "dataset") -> str:
    if isinstance(path, HubRows):
        return "hub"
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


def iter_rows(path: Source, kind: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) — location is 'line N' or 'row N' — streaming where the format allows."""
    kind = kind or file_kind(path)
    if isinstance(path, HubRows):
        yield from path.rows()
    elif kind == "jsonl":
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
