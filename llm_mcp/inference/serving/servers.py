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

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import LlmMcpError
from llm_mcp.core.procs import free_port

# vLLM's LoRAConfig.max_lora_rank accepts only these values.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
START_WAIT_S = 25.0
MAX_RESTARTS = 3
MAX_SERVERS = int(os.environ.get("LLM_MCP_VLLM_MAX_SERVERS", "2"))
MAX_LORAS = int(os.environ.get("LLM_MCP_VLLM_MAX_LORAS", "4"))


class VllmError(LlmMcpError, RuntimeError):
    """vLLM refused a request, failed to start, or served something it should not."""


class VllmStarting(VllmError):
    """The vLLM server is still starting: call again in a few seconds (retryable)."""


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank` (at least 16, vLLM's default)."""
    for slot in VLLM_LORA_RANKS:
        if slot >= max(rank, 16):
            return slot
    raise VllmError(
        f"adapter rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}); "
        "serve the merged model instead: export_adapter(format='merged')"
    )


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _max_model_len(model_path: str, cap: int) -> int | None:
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return cap
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("max_position_embeddings")
    return min(int(n), cap) if n else cap


@dataclass
class VllmServer:
    """One vLLM OpenAI-compatible server: a process we manage, or an external URL (proc None)."""

    model_path: str
    name: str  # the served model name of the base / merged model
    url: str
    api_key: str | None
    max_lora_rank: int = 16
    log_path: Path | None = None
    external: bool = False
    state: str = "starting"  # starting | ready | failed | stopped
    error: str | None = None
    proc: subprocess.Popen | None = None
    started_at: float = field(default_factory=time.monotonic)
    ready_s: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    restarts: int = 0
    crashed: bool = False  # failed after it had been ready: restarted on the next request
    adapters: dict[str, str] = field(default_factory=dict)  # served adapter name -> adapter key (path@mtime)

    # --- HTTP -------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 600.0) -> Any:
        """Call the server; a non-2xx answer raises VllmError with vLLM's own message."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.last_used = time.monotonic()
        try:
            r = httpx.request(method, self.url + path, json=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise VllmError(f"vLLM at {self.url} did not answer {method} {path}: {exc}") from None
        if r.status_code >= 400:
            try:
                message = r.json().get("error", {}).get("message") or r.text
            except ValueError:
                message = r.text
            raise VllmError(f"vLLM refused {method} {path} ({r.status_code}): {message[:800]}")
        try:
            return r.json()
        except ValueError:
            return r.text

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 12) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
        keep = [ln for ln in text.splitlines() if ln.strip() and "Route:" not in ln]
        return "\n".join(keep[-lines:])

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "model_path": self.model_path,
            "url": self.url,
            "state": self.state,
            "managed": not self.external,
            "pid": self.proc.pid if self.proc else None,
            "max_lora_rank": self.max_lora_rank,
            "adapters": sorted(self.adapters),
            "restarts": self.restarts,
            "ready_after_s": round(self.ready_s, 1) if self.ready_s else None,
            "log": str(self.log_path or ""),
        }


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
        if self.gpu:
            cmd += ["--gpu-memory-utilization", "0.5"]
        else:  # REFERENCE §5: on CPU this flag is the RAM fraction; float32 matches the in-process sampler
            cmd += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2"]
            cmd += ["--max-model-len", str(_max_model_len(server.model_path, 8192))]
        if trust_remote_code:
            cmd.append("--trust-remote-code")
        watch = [sys.executable, "-m", "llm_mcp.inference.serving.watch", str(os.getpid()), "--"]
        return watch + cmd + self.extra_args

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
                    url=self.url.rstrip("/"),
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
