"""The services every tool shares, one set per server process (stdio or HTTP, every session).

`AppState` is built once at start-up and handed to the tools through the server's lifespan
context (`ctx.request_context.lifespan_context`). Samplers and vLLM servers are created on first
use, so start-up never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llm_mcp.core.errors import ConfigurationError, InvalidArgumentError
from llm_mcp.core.hardware import detect
from llm_mcp.core.matrix import Matrix, load_matrix
from llm_mcp.core.methods.defaults import MethodDefaults, load_method_defaults
from llm_mcp.core.settings import Settings
from llm_mcp.core.store import JobStore
from llm_mcp.jobs.executor import Executor, make_executor
from llm_mcp.validation.finetune import ValidationContext

log = logging.getLogger(__name__)

MAX_SAMPLE_WAITING = 8
STORE_WAIT_S = 10.0  # a tool call waits this long for another process's write lock on jobs.db, then says so
LISTING_TTL_S = 5.0  # list_models answers are reused this long (free memory, local dirs change slowly)


class TtlCache:
    """A small bounded cache whose entries expire (identical list_models calls within a few seconds)."""

    def __init__(self, ttl_s: float, size: int = 64):
        self.ttl_s, self.size = ttl_s, size
        self._items: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        hit = self._items.get(key)
        return hit[1] if hit and hit[0] > time.monotonic() else None

    def put(self, key: Any, value: Any) -> None:
        if len(self._items) >= self.size:
            self._items.clear()
        self._items[key] = (time.monotonic() + self.ttl_s, value)


class SampleSlots:
    """Bounds the `sample` calls waiting for the (one-at-a-time) sampler; the rest are told to retry."""

    def __init__(self, limit: int = MAX_SAMPLE_WAITING):
        self.limit, self.waiting = limit, 0
        self._lock = threading.Lock()

    def __enter__(self) -> SampleSlots:
        with self._lock:
            if self.waiting >= self.limit:
                raise InvalidArgumentError(
                    f"the sampler is busy ({self.waiting} requests waiting); try again in a few seconds"
                )
            self.waiting += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.waiting -= 1


@dataclass
class AppState:
    """Process-wide services shared by every session: settings, matrix, jobs, samplers."""

    settings: Settings
    matrix: Matrix
    defaults: dict[str, MethodDefaults]
    store: JobStore
    executor: Executor
    listing_cache: TtlCache = field(default_factory=lambda: TtlCache(LISTING_TTL_S))
    sample_slots: SampleSlots = field(default_factory=SampleSlots)
    _lazy: dict[str, Any] = field(default_factory=dict)
    _lazy_lock: threading.RLock = field(default_factory=threading.RLock)  # vllm_sampler makes the pool inside

    @classmethod
    def load(cls, settings: Settings) -> AppState:
        """Validate the matrix and method configs, open the job store; ConfigurationError lists every problem."""
        matrix, defaults = load_matrix(settings.models_path), load_method_defaults()
        settings.ensure_home()
        settings.sample_backend()  # an unknown --sampler / LLM_MCP_SAMPLER stops start-up
        store = JobStore(settings.home, busy_timeout_s=STORE_WAIT_S, recover=True)
        for note in store.recovery_notes:
            log.warning("job store: %s", note)
        return cls(
            settings=settings,
            matrix=matrix,
            defaults=defaults,
            store=store,
            executor=make_executor(settings.executor, store, settings),
        )

    def _once(self, name: str, make) -> Any:
        with self._lazy_lock:
            if name not in self._lazy:
                self._lazy[name] = make()
            return self._lazy[name]

    @property
    def backend(self) -> str:
        """'vllm' or 'transformers', from --sampler (auto: vLLM when installed or LLM_MCP_VLLM_URL is set)."""
        return self.settings.sample_backend()

    @property
    def sampler(self):
        """The configured sampler, created on first use (torch is imported then, not at start-up)."""
        return self.vllm_sampler if self.backend == "vllm" else self.in_process_sampler

    @property
    def in_process_sampler(self):
        """The transformers backend (also answers `sample` for small models while vLLM is still starting)."""

        def make():
            from llm_mcp.inference.sampling import TransformersSampler

            return TransformersSampler()

        return self._once("transformers", make)

    @property
    def vllm_sampler(self):
        """The vLLM backend (serve_adapter uses it whichever backend `sample` uses)."""

        def make():
            from llm_mcp.inference.serving.sampler import VllmSampler

            return VllmSampler(self.pool)

        return self._once("vllm", make)

    @property
    def pool(self):
        """The vLLM servers (managed processes, or the external LLM_MCP_VLLM_URL)."""

        def make():
            from llm_mcp.inference.serving.servers import VllmPool

            s = self.settings
            return VllmPool(
                s.home,
                url=s.vllm_url,
                api_key=s.vllm_api_key,
                idle_s=s.vllm_idle_s,
                extra_args=s.vllm_args,
                gpu=detect().device == "cuda",
            )

        return self._once("pool", make)

    def executor_for(self, engine: str) -> Executor:
        """The executor that runs jobs of `engine` (a job started under another --executor keeps its engine)."""
        if engine == self.executor.name:
            return self.executor
        return self._once(f"executor:{engine}", lambda: make_executor(engine, self.store, self.settings))

    def hardware(self):
        """What a job may run on: this machine (local executor) or one node of the cluster and how many."""
        return self.executor.hardware()

    def validation_context(self) -> ValidationContext:
        """What a start_finetune request is checked against: fresh queue counts and resume sources (the
        executor is polled first; the job watcher does this too), this executor's hardware and reach."""
        try:
            self.executor.poll()
        except ConfigurationError as exc:
            log.warning("polling the %s executor: %s", self.executor.name, exc)
        return ValidationContext(
            matrix=self.matrix,
            settings=self.settings,
            defaults=self.defaults,
            hardware=self.hardware(),
            store=self.store,
            queued=self.store.count(("queued",)),
            home_warning=self.executor.home_warning(),
        )

    def activity(self, base_id: str) -> str:
        """What a long sample / serve call is doing, for its progress notifications."""
        starting = self.starting_servers()
        return f"starting vLLM for {starting[0]}" if starting else f"generating with {base_id}"

    def starting_servers(self) -> list[str]:
        """Names of managed vLLM servers still starting (none if no pool was ever needed)."""
        pool = self._lazy.get("pool")
        return [srv.name for srv in list(pool.servers.values()) if srv.state == "starting"] if pool else []

    def startup(self) -> None:
        """Re-attach to jobs an earlier server left: record dead ones with their cause, start queued ones."""
        self.executor.reattach()

    def shutdown(self) -> None:
        """Stop the managed vLLM servers; jobs keep running under their executor."""
        pool = self._lazy.get("pool")
        if pool is not None:
            pool.shutdown()
