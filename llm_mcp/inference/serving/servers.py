"""vLLM servers for sampling and serving: managed `vllm serve` processes or one external URL.

Managed mode starts one OpenAI-compatible vLLM server per served model (a base model, or a merged
DoRA / sparse result) with LoRA enabled and runtime adapter loading on. Each runs under
`llm_mcp.inference.serving.watch`, so it dies with the MCP server even after a SIGKILL. A crashed server
is restarted on the next request (at most MAX_RESTARTS times); an idle one is stopped after
`LLM_MCP_VLLM_IDLE_S`. vLLM takes tens of seconds to start: callers wait at most START_WAIT_S and
get `VllmStarting` (a retryable error) while it is still coming up.

External mode (`LLM_MCP_VLLM_URL`) talks to a server somebody else runs; adapter paths must be
readable on that machine and it must allow runtime LoRA loading.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llm_mcp.core.procs import free_port
from llm_mcp.inference.serving.server import (
    MAX_LORAS,
    MAX_MODEL_LEN,
    MAX_RESTARTS,
    MAX_SERVERS,
    START_WAIT_S,
    VLLM_LORA_RANKS,
    VllmError,
    VllmServer,
    VllmStarting,
    gpu_memory_utilization,
    lora_rank_slot,
    max_model_len,
    vllm_installed,
    weights_gb,
)

__all__ = ["START_WAIT_S", "VllmError", "VllmPool", "VllmServer", "VllmStarting", "lora_rank_slot", "vllm_installed"]


class VllmPool:
    """The vLLM servers this MCP server uses; thread-safe."""

    def __init__(
        self,
        home: Path,
        *,
        url: str | None = None,
        api_key: str | None = None,
        idle_s: float = 900.0,
        extra_args: str = "",
        gpu: bool = False,
    ):
        self.dir = home / "serving"
        self.url, self.api_key, self.idle_s, self.gpu = url, api_key, idle_s, gpu
        self.extra_args = shlex.split(extra_args)
        self.servers: dict[str, VllmServer] = {}
        self._lock = threading.RLock()
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

    # --- managed processes --------------------------------------------------------------------------
    def _command(self, server: VllmServer, trust_remote_code: bool, port: int) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            server.model_path,
            "--served-model-name",
            server.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enable-lora",
            "--max-lora-rank",
            str(server.max_lora_rank),
            "--max-loras",
            str(MAX_LORAS),
            "--max-cpu-loras",
            str(MAX_LORAS * 4),
            "--uvicorn-log-level",
            "warning",
            "--load-format",
            "safetensors",
        ]  # never unpickle a .bin checkpoint
        if self.gpu:  # what is free now, not a fixed half: an 8B model's weights do not fit half of 24 GB
            total, free = self._gpu_memory(server)
            utilization = gpu_memory_utilization(total, free, weights_gb(server.model_path), server.name)
            server.claimed_gb = utilization * total
            cmd += ["--gpu-memory-utilization", str(utilization)]
        else:  # REFERENCE §5: on CPU this flag is the RAM fraction; float32 matches the in-process sampler
            cmd += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2"]
        # Llama 3.1 would otherwise reserve KV cache for its whole 128k context
        cmd += ["--max-model-len", str(max_model_len(server.model_path, MAX_MODEL_LEN))]
        if trust_remote_code:
            cmd.append("--trust-remote-code")
        watch = [sys.executable, "-m", "llm_mcp.inference.serving.watch", str(os.getpid()), "--"]
        return watch + cmd + self.extra_args

    def _gpu_memory(self, new: VllmServer) -> tuple[float, float | None]:
        """(total, free) GB of the GPU a new server starts on, less what servers still starting will claim (vLLM
        allocates its share only once loaded, so nvidia-smi does not show it yet)."""
        from llm_mcp.core.hardware import detect

        gpu = detect().gpus[0]
        starting = sum(s.claimed_gb for s in self.servers.values() if s.state == "starting" and s is not new)
        return gpu.memory_gb, None if gpu.free_gb is None else max(0.0, gpu.free_gb - starting)

    def _spawn(self, server: VllmServer, trust_remote_code: bool) -> None:
        port = free_port()
        server.url, server.state, server.error = f"http://127.0.0.1:{port}", "starting", None
        server.started_at, server.ready_s, server.adapters = time.monotonic(), None, {}
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_API_KEY": server.api_key or "",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if not self.gpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.dir.mkdir(parents=True, exist_ok=True)
        assert server.log_path is not None, "a managed server has a log"
        with open(server.log_path, "ab") as log:
            log.write(f"\n[llm-mcp] starting vLLM for {server.name} on port {port}\n".encode())
            log.flush()
            server.proc = subprocess.Popen(
                self._command(server, trust_remote_code, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._start_reaper()

    def _refresh(self, server: VllmServer) -> None:
        """Move a managed server between starting / ready / failed from its process and /health."""
        if server.external or server.state in ("failed", "stopped"):
            return
        code = server.proc.poll() if server.proc else None
        if code is not None:
            tail = server.log_tail()
            was = server.state
            server.state = "failed"
            server.error = (
                f"vLLM for {server.name} {'crashed' if was == 'ready' else 'exited while starting'} "
                f"(exit code {code}). Last log lines ({server.log_path}):\n{tail}"
            )
            server.crashed = was == "ready"
            return
        if server.state == "starting" and server.healthy():
            server.state, server.ready_s = "ready", time.monotonic() - server.started_at

    def server_for(
        self,
        model_path: str,
        name: str,
        *,
        rank: int = 0,
        trust_remote_code: bool = False,
        wait_s: float = START_WAIT_S,
    ) -> tuple[VllmServer, bool]:
        """A ready server for `model_path` whose max_lora_rank holds `rank`; (server, started_in_this_call).

        Raises:
            VllmStarting: still starting after `wait_s` (call again).
            VllmError: it failed to start or keeps crashing (with the log tail), or the external
                server serves another model.
        """
        if self.url:
            return self._external(model_path, name), False
        with self._lock:
            server = self.servers.get(model_path)
            if server is not None:
                self._refresh(server)
                needs_rank = rank and lora_rank_slot(rank) > server.max_lora_rank
                if server.state == "failed" or needs_rank:
                    if server.state == "failed" and not server.crashed:
                        del self.servers[model_path]
                        raise VllmError(server.error)
                    if server.crashed and server.restarts >= MAX_RESTARTS:
                        del self.servers[model_path]
                        raise VllmError(
                            f"{server.error}\nIt crashed {server.restarts + 1} times; not restarting. "
                            "Fix the cause, then call again."
                        )
                    self._stop(server)
                    if needs_rank:  # restart with a larger rank slot; adapters are re-registered on use
                        server.max_lora_rank = lora_rank_slot(rank)
                    else:
                        server.restarts += 1
                    server.crashed = False
                    self._spawn(server, trust_remote_code)
            else:
                while len(self.servers) >= MAX_SERVERS:  # make room: stop the least recently used
                    oldest = min(self.servers.values(), key=lambda s: s.last_used)
                    self._stop(oldest)
                    del self.servers[oldest.model_path]
                server = VllmServer(
                    model_path=model_path,
                    name=name,
                    url="",
                    api_key=secrets.token_urlsafe(24),
                    max_lora_rank=lora_rank_slot(rank),
                    log_path=self.dir / f"vllm-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[-80:]}.log",
                )
                self.servers[model_path] = server
                self._spawn(server, trust_remote_code)
        started = self._wait(server, wait_s)
        server.last_used = time.monotonic()
        return server, started

    def _wait(self, server: VllmServer, wait_s: float) -> bool:
        """Wait up to wait_s for `server` to be ready. True if it became ready during this call."""
        was_ready = server.state == "ready"
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                self._refresh(server)
            if server.state == "ready":
                return not was_ready
            if server.state == "stopped":
                raise VllmError(f"vLLM for {server.name} was stopped while starting (server shutdown); call again")
            if server.state == "failed":
                with self._lock:
                    self.servers.pop(server.model_path, None)
                raise VllmError(server.error or "vLLM failed")
            if time.monotonic() >= deadline:
                raise VllmStarting(
                    f"vLLM for {server.name} is still starting ({time.monotonic() - server.started_at:.0f} s so far; "
                    f"about 30-40 s on a 2-core CPU). Call again in ~15 s. Log: {server.log_path}"
                )
            time.sleep(0.25)

    def _external(self, model_path: str, name: str) -> VllmServer:
        with self._lock:
            server = self.servers.get("external")
            if server is None:
                server = VllmServer(
                    model_path="",
                    name="",
                    url=(self.url or "").rstrip("/"),
                    api_key=self.api_key,
                    max_lora_rank=VLLM_LORA_RANKS[-1],
                    external=True,
                    state="ready",
                )
                models = server.request("GET", "/v1/models", timeout=10)["data"]
                base = next((m for m in models if not m.get("parent")), None)
                if base is None:
                    raise VllmError(f"the vLLM server at {self.url} lists no base model")
                server.name, server.model_path = base["id"], base.get("root") or base["id"]
                self.servers["external"] = server
        wanted = {model_path, name, str(Path(model_path).resolve()) if model_path.startswith("/") else model_path}
        if not wanted & {server.name, server.model_path}:
            raise VllmError(
                f"the vLLM server at {self.url} serves {server.name!r} ({server.model_path}), not "
                f"{name!r}; point LLM_MCP_VLLM_URL at a server for {name!r} or use --sampler transformers"
            )
        server.last_used = time.monotonic()
        return server

    def _stop(self, server: VllmServer) -> None:
        if server.proc and server.proc.poll() is None:
            server.proc.terminate()  # the watcher stops vLLM's engine and workers, then exits
            try:
                server.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(timeout=5)
        server.state = "stopped"

    def stop(self, model_path: str) -> bool:
        with self._lock:
            server = self.servers.pop(model_path, None)
            if server is None or server.external:
                return False
            self._stop(server)
            return True

    def _start_reaper(self) -> None:
        if self._reaper is None and self.idle_s > 0:
            self._reaper = threading.Thread(target=self._reap_idle, name="vllm-idle", daemon=True)
            self._reaper.start()

    def _reap_idle(self) -> None:
        while not self._closed.wait(min(5.0, self.idle_s)):
            with self._lock:
                for server in list(self.servers.values()):
                    idle = time.monotonic() - server.last_used > self.idle_s
                    if not server.external and server.state != "starting" and idle:
                        self._stop(server)
                        del self.servers[server.model_path]

    def shutdown(self) -> None:
        """Stop every managed server (called when the MCP server exits)."""
        self._closed.set()
        with self._lock:
            for server in list(self.servers.values()):
                if not server.external:
                    self._stop(server)
            self.servers.clear()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            for server in self.servers.values():
                self._refresh(server)
            return [s.describe() for s in self.servers.values()]
