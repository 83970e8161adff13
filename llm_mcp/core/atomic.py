"""All-or-nothing writes: what a failure half-way (a full disk, a crash, a second writer) cannot corrupt.

- `create_new`: a new file under a temporary name, then linked into place only if nothing is there: a
  second writer of the same name gets FileExistsError, never a silent replacement.
- `replace`: a temporary file renamed over the old one: readers see the old or the new, never half.
- `append`: under an exclusive lock, every byte written (a short write is not success) and synced, or
  the file cut back to its size before, so it is as it was.
- `claim`: a lock file naming its owner process, for work that must not run twice on one destination.

`DiskFullError` says how much room there is where, so a cause reads "No space left on device (3 MB free
in /home/u/.llm_mcp/data)", never a traceback line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from llm_mcp.core.errors import LlmMcpError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# What a write that did not fit leaves in an error or a log: Python's OSError, torch's serializer, the errno.
DISK_FULL = re.compile(r"No space left on device|file write failed|\[Errno 28\]|Disk quota exceeded")


class DiskFullError(LlmMcpError, OSError):
    """A write did not fit: the message names the free space and where."""


def free_mb(path: Path) -> float:
    """Free space (MB) on the filesystem holding `path` (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return round(shutil.disk_usage(probe).free / 2**20, 1)
    except OSError:
        return float("nan")


def no_space(path: Path, needed: int | None = None) -> DiskFullError:
    """The error for a write to `path` that did not fit."""
    need = f", {needed / 2**20:.1f} MB needed" if needed else ""
    err = DiskFullError(
        f"No space left on device ({free_mb(path):g} MB free in {path.parent}{need}); free disk space, then call again"
    )
    err.errno = errno.ENOSPC
    return err


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a write that did not fit."""
    while exc is not None:
        if (isinstance(exc, OSError) and exc.errno in NO_SPACE) or DISK_FULL.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def disk_full_cause(directory: Path) -> str:
    """The one-line cause of a job that ran out of disk."""
    return f"No space left on device ({free_mb(directory):g} MB free in {directory})"


def check_room(path: Path, needed: int, margin: int = 64 << 10) -> None:
    """Refuse before writing when `needed` bytes (plus a margin) cannot fit beside `path`."""
    try:
        free = shutil.disk_usage(path.parent if not path.is_dir() else path).free
    except OSError:
        return
    if free < needed + margin:
        raise no_space(path, needed)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a short write (a nearly full disk) is followed by the error."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def _temporary(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in NO_SPACE:
            raise no_space(path, len(data)) from exc
        raise
    return tmp


def create_new(path: Path, data: bytes) -> None:
    """Write a new file whole, or nothing.

    Raises:
        FileExistsError: something is already at `path` (another writer got there first).
        DiskFullError: it does not fit.
    """
    tmp = _temporary(path, data)
    try:
        os.link(tmp, path)  # atomic and exclusive: fails if `path` exists
    finally:
        tmp.unlink(missing_ok=True)


def replace(path: Path, data: bytes) -> None:
    """Replace `path` with `data` whole, or leave it as it was."""
    tmp = _temporary(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append(path: Path, data: bytes) -> int:
    """Append `data` whole (after a newline if the file does not end with one), or leave the file as it was.

    Appenders take turns (an exclusive lock on the file). Returns the file's new size.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        before = os.fstat(fd).st_size
        if before and os.pread(fd, 1, before - 1) != b"\n":
            data = b"\n" + data
        try:
            write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, before)
            os.fsync(fd)
            if exc.errno in NO_SPACE:
                raise no_space(path, len(data)) from exc
            raise
        return before + len(data)
    finally:
        os.close(fd)  # releases the lock


def _owner_alive(owner: dict | None) -> bool:
    if not owner:
        return False
    try:
        proc = psutil.Process(owner["pid"])
        return abs(proc.create_time() - owner["started_at"]) <= 1 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError):
        return False


@contextmanager
def claim(lock: Path, wait_s: float, poll_s: float = 0.1) -> Iterator[bool]:
    """Hold `lock` (a file naming this process) while the block runs; a lock whose owner is gone is taken over.

    Yields True once held, or False when another live process still held it after `wait_s`.
    """
    me = {"pid": os.getpid(), "started_at": psutil.Process().create_time()}
    deadline = time.monotonic() + wait_s
    held = False
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "null")
            except (OSError, ValueError):
                owner = None
            stale = not _owner_alive(owner) and (owner is not None or _age(lock) > 5)
            if stale:
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        held = True
        break
    try:
        yield held
    finally:
        if held:
            lock.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
