"""`python -m llm_mcp.inference.serving.watch PARENT_PID -- CMD...`: run one managed vLLM server, never orphaned.

vLLM spawns an engine process and workers. This watcher becomes their subreaper and ends all of
them when (a) it gets SIGTERM (the MCP server stops the model), (b) the MCP server that started
it disappears, even by SIGKILL (its parent pid changes), or (c) vLLM itself exits. So no vLLM
process outlives the server that asked for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from llm_mcp.core.procs import become_subreaper, signal_descendants

STOP_GRACE_S = 5.0


def _stop_all(proc: subprocess.Popen) -> None:
    signal_descendants(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    signal_descendants(signal.SIGKILL)
    _reap()


def _reap() -> None:
    """Wait for every child, including vLLM workers re-parented to this subreaper."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    cmd = argv[argv.index("--") + 1 :]
    become_subreaper()
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    while True:
        code = proc.poll()
        if code is not None:
            print(f"[llm-mcp watch] vLLM exited with code {code}", file=sys.stderr, flush=True)
            _stop_all(proc)
            return code
        if stop["requested"] or os.getppid() != parent:
            why = "stop requested" if stop["requested"] else f"the MCP server (pid {parent}) is gone"
            print(f"[llm-mcp watch] {why}: stopping vLLM", file=sys.stderr, flush=True)
            _stop_all(proc)
            return 0
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
