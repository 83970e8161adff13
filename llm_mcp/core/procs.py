"""Process and port helpers shared by the job supervisor and the vLLM servers (Linux-first, psutil elsewhere)."""

from __future__ import annotations

import ctypes
import signal
import socket

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt orphaned descendants, so they can be awaited and killed (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
