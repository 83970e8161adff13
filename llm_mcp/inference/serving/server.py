"""One vLLM OpenAI-compatible server (`VllmServer`): a process llm_mcp manages or an external URL; its HTTP
calls, health and log; and the errors vLLM serving raises."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import LlmMcpError

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
    return importlib.util.find_spec("vllm") is not None


MAX_MODEL_LEN = 8192  # the context a managed server reserves KV cache for (LLM_MCP_VLLM_ARGS may raise it)
GPU_UTILIZATION_CAP = 0.9  # vLLM's own default
HEADROOM_GB = 1.0  # left free beside a new server (CUDA context, other processes' growth)
MIN_KV_GB = 1.0  # the least KV cache worth starting a server for


def weights_gb(model_path: str) -> float:
    """The size of a local checkpoint's safetensors (0 when it is not a local directory)."""
    path = Path(model_path)
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**30 if path.is_dir() else 0.0


def gpu_memory_utilization(total_gb: float, free_gb: float | None, model_gb: float, name: str) -> float:
    """The --gpu-memory-utilization a new server can have: vLLM refuses to start when the fraction it asks for is
    more than is free, so it is what is free now (less HEADROOM_GB) over the total, at most 0.9.

    Raises:
        VllmError: the free memory cannot hold the weights and MIN_KV_GB of cache (with what holds the rest).
    """
    free = total_gb if free_gb is None else free_gb
    fraction = min(GPU_UTILIZATION_CAP, max(0.0, free - HEADROOM_GB) / total_gb)
    if fraction * total_gb < model_gb + MIN_KV_GB:
        raise VllmError(
            f"not enough free GPU memory to serve {name}: {free:.1f} of {total_gb:.0f} GB free, its weights need "
            f"{model_gb:.1f} GB plus {MIN_KV_GB:g} GB of cache (a training job or another vLLM server holds the rest). "
            "Next: wait for the job to finish or cancel_job it, or sample with --sampler transformers"
        )
    return round(fraction, 3)


def max_model_len(model_path: str, cap: int) -> int | None:
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
    claimed_gb: float = 0.0  # GPU memory its --gpu-memory-utilization reserves once it has loaded
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
