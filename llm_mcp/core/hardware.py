"""What this machine can train on, detected without importing torch.

GPUs come from `nvidia-smi` (a few ms, no CUDA context in our process): their names and totals are
cached for the life of the process, their free memory is re-read when older than FREE_TTL_S. RAM comes
from /proc/meminfo (or sysconf), read afresh on every call. GPU memory that running vLLM servers claim
(`--gpu-memory-utilization` x the GPU's memory, held from their start) is not usable by a job.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from llm_mcp.core.estimates import GPU_USABLE_FRACTION, RAM_USABLE_FRACTION, GiB

FREE_TTL_S = 5.0  # how long a reading of free GPU memory is reused


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    free_gb: float | None = None  # right now (within FREE_TTL_S); None when unknown


@dataclass(frozen=True)
class Hardware:
    gpus: list[GPU] = field(default_factory=list)
    ram_gb: float = 0.0
    available_ram_gb: float = 0.0
    cpu_count: int = 1
    source: str = "detected"
    claimed_fraction: float = 0.0  # of each GPU's memory held by running vLLM servers
    max_nodes: int = 1  # machines like this one a job may span (a cluster partition's nodes)

    @property
    def device_gb(self) -> float:
        """The smallest GPU's memory (every replicated process needs its whole share on its own GPU)."""
        return min((g.memory_gb for g in self.gpus), default=0.0)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @property
    def gpu_memory_gb(self) -> float:
        return round(sum(g.memory_gb for g in self.gpus), 1)

    def usable_gb(self) -> float:
        """Memory one training process may plan on: 95% of one GPU (the smallest) less what vLLM servers
        claim on it, or 85% of total RAM (shared by all processes on a CPU-only machine).

        Both are of totals, so the answer does not drift from call to call with what other programs
        hold; start_finetune warns separately when less is free right now. A data-parallel (DDP)
        process holds a whole replica, so this is per device, never the sum over GPUs.
        """
        if self.gpus:
            return round(max(0.0, self.device_gb * (GPU_USABLE_FRACTION - self.claimed_fraction)), 2)
        return round(self.ram_gb * RAM_USABLE_FRACTION, 2)

    def free_gb(self) -> float | None:
        """Free memory right now on the fullest GPU, or available RAM; None when not known."""
        if self.gpus:
            free = [g.free_gb for g in self.gpus if g.free_gb is not None]
            return min(free) if free else None
        return self.available_ram_gb

    def describe(self) -> str:
        if self.source not in ("detected", "hypothetical"):  # a cluster: one node as planned for, and how many
            each = Hardware(
                gpus=self.gpus, ram_gb=self.ram_gb, available_ram_gb=self.available_ram_gb, cpu_count=self.cpu_count
            ).describe()
            return f"{self.source}: {self.max_nodes} node{'s' if self.max_nodes != 1 else ''}, each {each}"
        if self.gpus:
            names = {g.name for g in self.gpus}
            per = self.gpus[0].memory_gb
            claimed = f"; vLLM servers claim {self.claimed_fraction:.0%} of each" if self.claimed_fraction else ""
            return (
                f"{len(self.gpus)}x {'/'.join(sorted(names))} ({per:g} GB each, {self.gpu_memory_gb:g} GB total"
                f"{claimed})"
            )
        return f"CPU only: {self.cpu_count} cores, {self.ram_gb:g} GB RAM ({self.available_ram_gb:g} GB available)"

    @classmethod
    def hypothetical(cls, gpu_memory_gb: float, num_gpus: int = 1) -> Hardware:
        """A machine to plan for: `num_gpus` GPUs of `gpu_memory_gb` each."""
        gpus = [GPU(name="hypothetical GPU", memory_gb=gpu_memory_gb) for _ in range(num_gpus)]
        return cls(gpus=gpus, source="hypothetical")


# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) by GPU name; the first match wins.
BF16_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def gpu_bf16_peak_flops(name: str) -> float:
    """The GPU's dense bf16 peak (V100 / T4: their fp16 peak), 150 TFLOP/s for a name not listed."""
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), 150e12)


def _meminfo() -> tuple[float, float]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
        return fields["MemTotal"] / GiB, fields.get("MemAvailable", fields["MemTotal"]) / GiB
    except (OSError, KeyError, ValueError, IndexError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
        return total, total


def _nvidia_smi(query: str) -> list[list[str]]:
    """Rows of `nvidia-smi --query-gpu=QUERY` (no header, no units); [] without a working nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.rsplit(",", query.count(","))] for line in out.strip().splitlines()]


def visible(rows: list[list[str]], setting: str | None) -> list[list[str]]:
    """The rows of `nvidia-smi --query-gpu=index,uuid,...` that CUDA_VISIBLE_DEVICES (`setting`) leaves visible,
    in its order: indices or UUIDs (a unique prefix will do), up to the first one that matches nothing, as CUDA
    reads it; unset: all; empty: none."""
    if setting is None:
        return rows
    picked: list[list[str]] = []
    for item in (x.strip() for x in setting.split(",")):
        match = [
            r for r in rows if item and (r[0] == item or (item.startswith(("GPU-", "MIG-")) and r[1].startswith(item)))
        ]
        if len(match) != 1 or match[0] in picked:
            break
        picked.append(match[0])
    return picked


def _visible_rows(query: str) -> list[list[str]]:
    """nvidia-smi's `query` fields for the GPUs this process can use (CUDA_VISIBLE_DEVICES applied)."""
    rows = _nvidia_smi(f"index,uuid,{query}")
    return [r[2:] for r in visible(rows, os.environ.get("CUDA_VISIBLE_DEVICES"))]


def _nvidia_gpus() -> list[GPU]:
    gpus = []
    for name, mib in _visible_rows("name,memory.total"):
        try:
            gpus.append(GPU(name=name, memory_gb=round(float(mib) / 1024, 1)))
        except ValueError:
            continue
    return gpus


@lru_cache(maxsize=1)
def _gpus() -> tuple[GPU, ...]:
    return tuple(_nvidia_gpus())


_FREE: dict[str, Any] = {"at": 0.0, "gb": []}


def _free_gb(n: int) -> list[float | None]:
    """Free memory per GPU, re-read from nvidia-smi when the last reading is older than FREE_TTL_S."""
    if time.monotonic() - float(_FREE["at"]) > FREE_TTL_S:
        rows = _visible_rows("memory.free")
        _FREE["gb"] = [round(float(r[0]) / 1024, 1) if r and r[0].replace(".", "").isdigit() else None for r in rows]
        _FREE["at"] = time.monotonic()
    got = list(_FREE["gb"])
    return (got + [None] * n)[:n]


VLLM_ENTRY = "vllm.entrypoints.openai.api_server"


def vllm_claimed_fraction() -> float:
    """The fraction of GPU memory running vLLM servers claim: the sum of their --gpu-memory-utilization
    (vLLM's default 0.9 when not given), capped at 1. vLLM reserves it at start, before nvidia-smi shows it."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if VLLM_ENTRY not in cmd and not any(c.endswith("vllm") and n == "serve" for c, n in itertools.pairwise(cmd)):
            continue
        if "llm_mcp.inference.serving.watch" in cmd:
            continue  # the watcher's own command line repeats the server's
        value = next((cmd[i + 1] for i, c in enumerate(cmd[:-1]) if c == "--gpu-memory-utilization"), "0.9")
        try:
            total += float(value)
        except ValueError:
            total += 0.9
    return min(1.0, total)


def detect() -> Hardware:
    """Detect GPUs (NVIDIA: names and totals once per process, free memory within FREE_TTL_S), vLLM
    servers' claims on them, and RAM (now). Honors CUDA_VISIBLE_DEVICES (indices or UUIDs; empty: no GPU)."""
    total, available = _meminfo()
    gpus = [GPU(g.name, g.memory_gb, free) for g, free in zip(_gpus(), _free_gb(len(_gpus())))]
    return Hardware(
        gpus=gpus,
        ram_gb=round(total, 1),
        available_ram_gb=round(available, 1),
        cpu_count=os.cpu_count() or 1,
        claimed_fraction=vllm_claimed_fraction() if gpus else 0.0,
    )
