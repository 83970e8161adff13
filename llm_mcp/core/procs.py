"""Process and port helpers shared by the job supervisor and the vLLM servers (Linux-first, psutil elsewhere)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt orphaned descendants, so they can be awaited and killed (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def detached(module: str, arg: str, log: Path, append: bool = False) -> None:
    """Start `python -m module arg` in its own session (it outlives this process), output into `log`."""
    with open(log, "ab" if append else "wb") as out:
        subprocess.Popen(
            [sys.executable, "-m", module, arg],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def signal_descendants(sig: int = signal.SIGKILL) -> int:
    """Send `sig` to every descendant of this process. Returns how many were signalled."""
    n = 0
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(sig)
            n += 1
        except psutil.Error:
            pass
    return n


def end_tree(pid: int, grace_s: float = 0.0) -> None:
    """End a process and every process under it: SIGTERM, then SIGKILL to what is left after `grace_s`
    (grace_s 0: SIGKILL at once), waiting for them to go (at most 10 s after the SIGKILL)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    alive = tree
    if grace_s > 0:
        for proc in tree:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_process(num_processes: int, env: dict[str, str] | None = None, cores: int | None = None) -> int:
    """Intra-op threads for each training process: the user's OMP_NUM_THREADS if set, else cores // processes
    (`cores`: of the machine the processes run on; default this one's usable cores).

    `accelerate launch` passes OMP_NUM_THREADS on to its workers and sets it to 1 when it is unset, so
    the job's environment must carry this value or a CPU job trains on one core.
    """
    given = (os.environ if env is None else env).get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, (cores or usable_cores()) // max(1, num_processes))
