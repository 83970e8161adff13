"""Importing a user's file or a Hub dataset into LLM_MCP_HOME/data as canonical JSONL, in a detached worker.

    python -m llm_mcp.core.importer SPEC_FILE

`save_dataset(source=...)` writes the spec next to the destination and starts the worker, which streams the
rows (llm_mcp.core.data: any format, a column mapping applied), downloads a Hub dataset into the Hugging Face
cache first when it is not there, and writes each row as training reads it. The worker reports progress in
`data/.imports/NAME.jsonl.json` and holds the destination's lock (`.NAME.jsonl.writing`) while it runs, so a 2 GB file
never loads into the server, never blocks it, and two imports never write one file. The destination changes
all at once or not at all (llm_mcp.core.atomic): a new file is linked in place only if nothing is there, an
overwrite is a rename, an append is cut back if it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from llm_mcp.core import atomic
from llm_mcp.core.atomic import DiskFullError, check_room, write_all
from llm_mcp.core.data import MAX_BAD_ROWS_SHOWN, parse_row, row_warnings
from llm_mcp.core.formats import apply_columns
from llm_mcp.core.hub_datasets import HubRef, HubRows, cache_dir, cached_snapshot, resolve
from llm_mcp.core.procs import detached
from llm_mcp.core.readers import Source, iter_rows

IMPORT_WAIT_S = 20.0  # a call waits this long for the import; a longer one reports its progress
PROGRESS_EVERY_S = 0.5
MAX_APPEND_BYTES = 1 << 30  # an append is read whole to be all-or-nothing


def lock_of(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.writing")


def aside(dest: Path, suffix: str) -> Path:
    """An import's own files (report, spec, log): in data/.imports, out of the dataset listing."""
    return dest.parent / ".imports" / f"{dest.name}{suffix}"


def report_of(dest: Path) -> Path:
    return aside(dest, ".json")


def spec_id(spec: dict[str, Any]) -> str:
    """What identifies one import: the same arguments on the same source bytes are the same import."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def source_identity(source: Source | str) -> dict[str, Any]:
    """The source's identity for spec_id: a file's size and mtime, a Hub dataset's commit (or the id asked for)."""
    if isinstance(source, HubRows):
        return {"hub": source.ref.model_dump()}
    if isinstance(source, str):
        return {"hub_id": source}
    st = source.stat()
    return {"path": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_report(dest: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(report_of(dest).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def running(dest: Path) -> bool:
    """Whether a live worker holds the destination's lock."""
    try:
        owner = json.loads(lock_of(dest).read_text() or "null")
    except (OSError, ValueError):
        return False
    return atomic._owner_alive(owner)


def start(spec: dict[str, Any], dest: Path) -> None:
    """Write the spec and start the detached worker (it claims the lock itself)."""
    aside(dest, "").parent.mkdir(parents=True, exist_ok=True)
    spec_file = aside(dest, ".spec.json")
    atomic.replace(spec_file, json.dumps(spec).encode())
    atomic.replace(report_of(dest), json.dumps({"id": spec["id"], "state": "starting", "rows": 0}).encode())
    detached("llm_mcp.core.importer", str(spec_file), aside(dest, ".log"))


def wait(dest: Path, import_id: str, wait_s: float | None = None) -> dict[str, Any]:
    """The import's report once it has ended, or its progress after `wait_s` (default IMPORT_WAIT_S)."""
    deadline = time.monotonic() + (IMPORT_WAIT_S if wait_s is None else wait_s)
    started = time.monotonic()
    while True:
        report = read_report(dest) or {}
        if report.get("id") == import_id and report.get("state") in ("done", "refused", "failed"):
            return report
        alive = running(dest)
        if not alive and time.monotonic() - started > 10 and report.get("state") != "done":
            return {**report, "id": import_id, "state": "failed", "error": "the import worker ended without a report"}
        if time.monotonic() >= deadline:
            return {**report, "id": import_id}
        time.sleep(0.1)


class _Progress:
    def __init__(self, dest: Path, spec: dict[str, Any]):
        self.dest, self.report = dest, {"id": spec["id"], "state": "starting", "rows": 0, "bad_rows": 0}
        self.last = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.report.update(fields)
        if force or time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            try:
                atomic.replace(report_of(self.dest), json.dumps(self.report).encode())
            except OSError:
                pass  # progress is best effort; the final report is retried by the caller's wait


def _download(ref: dict[str, Any], progress: _Progress) -> HubRows:
    """Download a Hub dataset into the Hugging Face cache (progress: bytes in its blobs folder), then pin it."""
    from huggingface_hub import HfApi, snapshot_download

    repo, revision = ref["repo"], ref.get("revision")
    total = None
    try:
        info = HfApi().dataset_info(repo, revision=revision, files_metadata=True, timeout=30)
        total = sum((s.size or 0) for s in (info.siblings or []))
    except Exception:  # the download below reports what is wrong; the total is only for progress
        pass
    blobs = cache_dir() / f"datasets--{repo.replace('/', '--')}" / "blobs"
    progress.update(force=True, state="downloading", total_bytes=total, downloaded_bytes=0)
    import threading

    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            size = sum(p.stat().st_size for p in blobs.glob("*")) if blobs.is_dir() else 0
            progress.update(force=True, downloaded_bytes=size)

    threading.Thread(target=watch, daemon=True).start()
    try:
        snapshot_download(repo, repo_type="dataset", revision=revision, cache_dir=cache_dir())
    finally:
        done.set()
    if cached_snapshot(repo, revision) is None:
        raise OSError(f"hf:{repo} was downloaded but is not in the cache at {cache_dir()}")
    return HubRows(resolve(f"hf:{repo}", ref.get("subset"), ref.get("split"), revision))


def _convert(source: Source, spec: dict[str, Any], tmp: Path, progress: _Progress) -> dict[str, Any]:
    """Stream `source` into `tmp` as canonical JSONL; the counts and the bad rows."""
    formats: Counter[str] = Counter()
    bad: list[str] = []
    flagged: Counter[str] = Counter()
    rows = bad_count = written = 0
    columns = spec.get("columns")
    progress.update(force=True, state="converting")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        buffer: list[bytes] = []
        for where, raw in iter_rows(source):
            try:
                if not isinstance(raw, dict) and hasattr(raw, "reason"):
                    raise ValueError(raw.reason)
                fmt, canonical = parse_row(apply_columns(raw, columns))
            except ValueError as exc:
                bad_count += 1
                if len(bad) < MAX_BAD_ROWS_SHOWN * 2:
                    bad.append(f"{where}: {exc}")
                continue
            formats[fmt] += 1
            for reason in row_warnings(canonical):
                flagged[reason] += 1
            buffer.append(json.dumps(canonical, ensure_ascii=False).encode() + b"\n")
            rows += 1
            if len(buffer) >= 512:
                data = b"".join(buffer)
                write_all(fd, data)
                written += len(data)
                buffer = []
                progress.update(rows=rows, bad_rows=bad_count, written_bytes=written)
        data = b"".join(buffer)
        write_all(fd, data)
        written += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {
        "rows": rows,
        "bad_rows": bad_count,
        "bad": bad,
        "formats": dict(formats),
        "written_bytes": written,
        "warnings": [f"{n} row(s) {reason}" for reason, n in flagged.items()],
    }


def _place(tmp: Path, dest: Path, mode: str) -> None:
    """Move the converted rows into place, all or nothing."""
    if mode == "overwrite":
        os.replace(tmp, dest)
    elif mode == "append":
        if tmp.stat().st_size > MAX_APPEND_BYTES:
            raise ValueError(f"an append adds at most {MAX_APPEND_BYTES >> 30} GB; import into a new name instead")
        check_room(dest, tmp.stat().st_size)
        atomic.append(dest, tmp.read_bytes())
    else:
        try:
            os.link(tmp, dest)  # exclusive: a file someone created meanwhile is never replaced
        except FileExistsError:
            raise ValueError(f"{dest.name} was created by someone else meanwhile; nothing was replaced") from None


def run(spec_file: Path) -> int:
    """The worker: claim the destination, convert, place, report."""
    spec = json.loads(spec_file.read_text())
    dest = Path(spec["dest"])
    progress = _Progress(dest, spec)
    with atomic.claim(lock_of(dest), wait_s=0) as held:
        if not held:
            return 0  # another worker is writing this destination; its report answers the callers
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")

        def fail(error: str) -> int:
            tmp.unlink(missing_ok=True)  # first: on a full disk this makes room for the report
            progress.update(force=True, state="failed", error=error)
            return 1

        try:
            if spec.get("hub") is not None:
                source: Source = HubRows(HubRef(**spec["hub"]))
            elif spec.get("hub_id") is not None:
                source = _download(spec["hub_id"], progress)
            else:
                source = Path(spec["path"])
            counts = _convert(source, spec, tmp, progress)
            if counts["bad_rows"] and not spec.get("skip_bad_rows"):
                progress.update(force=True, state="refused", **counts)
                return 0
            if counts["rows"] == 0:
                progress.update(force=True, state="refused", **counts, error="no usable rows")
                return 0
            _place(tmp, dest, spec["mode"])
            progress.update(force=True, state="done", source=str(source), **counts)
            return 0
        except DiskFullError as exc:
            return fail(str(exc))
        except (OSError, ValueError) as exc:
            full = atomic.disk_full(exc)
            return fail(atomic.disk_full_cause(dest.parent) if full else f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # reported to the caller; the worker must never leave it waiting
            return fail(f"{type(exc).__name__}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
            spec_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
