"""A job directory's files, read by the server, the trainer, export and sampling alike.

jobs/<id>/config.json        the typed job config (llm_mcp.core.jobconfig)
jobs/<id>/train.log          the trainer's output (job_status shows its tail)
jobs/<id>/metrics.jsonl      one JSON object per optimizer step, plus start / checkpoint / end events
jobs/<id>/checkpoints/step-NNNNNN/   complete checkpoints (written as .tmp, then renamed)
jobs/<id>/adapter/           the final adapter
jobs/<id>/result.json        how the trainer ended (state, error, next step)
jobs/<id>/ranks/<rank>.json  each process of a multi-process job: its node, pid, and how it ended (a rank with
                             no end lost its process or node without a word: kill -9, OOM killer, a node lost)
jobs/<id>/cancel             written by cancel_job: the trainer checkpoints and stops (works on any node
                             that sees the job directory, so cluster jobs need no signal to reach them)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from llm_mcp.core import atomic

METRICS_TAIL_BYTES = 256 * 1024


def checkpoints(job_dir: Path) -> list[tuple[int, Path]]:
    """A job's complete checkpoints as (step, directory), oldest first.

    A checkpoint is written as step-NNNNNN.tmp and renamed when whole, so only step-<digits> counts.
    """
    root = job_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()]
    return sorted(found)


CANCEL_FILE = "cancel"


def request_cancel(job_dir: Path) -> None:
    """Ask the job's processes, wherever they run, to checkpoint and stop after the current step."""
    (job_dir / CANCEL_FILE).write_text(f"{time.time():.3f}\n")


def cancel_requested(job_dir: Path) -> bool:
    return (job_dir / CANCEL_FILE).exists()


def write_result(job_dir: Path, fields: dict[str, Any]) -> None:
    """Write result.json whole or not at all (a crash or a full disk never leaves half of it, or a .tmp)."""
    atomic.replace(job_dir / "result.json", json.dumps(fields, indent=2).encode())


def write_rank(job_dir: Path, rank: int, fields: dict[str, Any]) -> None:
    """Record (or update) what one process of the job is: node, pid, and at the end how it ended."""
    path = job_dir / "ranks" / f"{rank}.json"
    path.parent.mkdir(exist_ok=True)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    atomic.replace(path, json.dumps({**old, **fields}).encode())


def read_ranks(job_dir: Path) -> list[dict[str, Any]]:
    """Every rank's record, by rank (empty for a one-process job)."""
    found = []
    for path in (job_dir / "ranks").glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            found.append(record)
    return sorted(found, key=lambda r: r["rank"])


def append_metric(job_dir: Path, record: dict[str, Any]) -> None:
    """Append one timestamped record to metrics.jsonl."""
    with open(job_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def read_result(job_dir: Path) -> dict | None:
    """result.json, or None when there is none; a file that is not a JSON object (truncated, edited by hand)
    reads as {"malformed": what is wrong}, which names no state."""
    path = job_dir / "result.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"malformed": f"result.json is not valid JSON ({exc})"}
    if not isinstance(data, dict):
        return {"malformed": f"result.json holds a {type(data).__name__}, not an object"}
    return data


def log_tail(job_dir: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    path = job_dir / "train.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - max_bytes))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    # Progress bars redraw with \r; keep what a terminal would show.
    out = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    return [ln for ln in out if ln.strip()][-lines:]


def read_metrics(job_dir: Path, max_bytes: int = METRICS_TAIL_BYTES) -> list[dict[str, Any]]:
    """Parsed metrics lines (the tail of a long file), skipping any partially written last line."""
    path = job_dir / "metrics.jsonl"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.seek(max(0, size - max_bytes))
            chunk = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = chunk.splitlines()
    if size > max_bytes:
        lines = lines[1:]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


_PATH = re.compile(r"(?<![\w.~])/(?:[\w.@+-]+/)*[\w.@+-]+")
_FRAME = re.compile(r'^\s*File "[^"]*", line \d+')


def redact_paths(text: str, home: Path) -> str:
    """Absolute paths outside the state directory (install paths, the system) shortened to their last part."""
    root = str(home.resolve())

    def shorten(m: re.Match) -> str:
        path = m.group(0)
        return path if path == root or path.startswith(root + "/") else ".../" + path.rsplit("/", 1)[-1]

    return _PATH.sub(shorten, text)


def public_log(lines: list[str], home: Path) -> list[str]:
    """Log lines fit to show an agent: traceback frames dropped (the exception line stays), paths redacted.

    A frame is dropped with its source lines also when the "Traceback" header has scrolled out of the window.
    The full log stays in the job directory and the jobs://{id}/log resource.
    """
    out, in_frames = [], False
    for line in lines:
        if line.startswith("Traceback (most recent call last)") or _FRAME.match(line):
            in_frames = True
            continue
        if in_frames and (line.startswith(("    ", "\t")) or not line.strip() or set(line.strip()) <= set("^~ ")):
            continue
        in_frames = False
        out.append(redact_paths(line, home))
    return out


def worst_rows(job_dir: Path, page: int = 1, per_page: int = 10) -> tuple[list[dict[str, Any]], int]:
    """An evaluation's per-row results, worst first (answers that missed, then the highest losses), one page of
    them and how many there are."""
    records = []
    try:
        with open(job_dir / "eval_rows.jsonl", encoding="utf-8") as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        return [], 0

    def badness(r: dict[str, Any]) -> tuple[float, float]:
        hits = [float(r[k]) for k in ("exact_match", "contains", "regex") if k in r]
        return (sum(hits) / len(hits) if hits else 1.0, -r.get("loss", 0.0))

    records.sort(key=badness)
    start = (max(page, 1) - 1) * per_page
    return [_shown(r) for r in records[start : start + per_page]], len(records)


def _shown(record: dict[str, Any]) -> dict[str, Any]:
    """A per-row result as an agent reads it: input, expected and got by those names, then the scores."""
    renamed = {"reference": "expected", "generated": "got"}
    return {renamed.get(k, k): v for k, v in record.items()}
