"""What this machine can train on, detected without importing torch.

GPUs come from `nvidia-smi` (a few ms, no CUDA context in our process; cached for the life
of the process); RAM from /proc/meminfo (or sysconf), read afresh on every call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache

from llm_mcp.core.estimates import GPU_USABLE_FRACTION, RAM_USABLE_FRACTION, GiB


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float


@dataclass(frozen=True)
class Hardware:
    gpus: list[GPU] = field(default_factory=list)
    ram_gb: float = 0.0
    available_ram_gb: float = 0.0
    cpu_count: int = 1
    source: str = "detected"

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @property
    def gpu_memory_gb(self) -> float:
        return round(sum(g.memory_gb for g in self.gpus), 1)

    def usable_gb(self) -> float:
        """Memory a training job may plan on: 95% of total GPU memory, or 85% of total RAM.

        Both are of the machine's total, so the answer does not drift from call to call with what
        other programs hold; start_finetune warns separately when less RAM is free right now.
        """
        if self.gpus:
            return round(self.gpu_memory_gb * GPU_USABLE_FRACTION, 2)
        return round(self.ram_gb * RAM_USABLE_FRACTION, 2)

    def describe(self) -> str:
        if self.gpus:
            names = {g.name for g in self.gpus}
            per = self.gpus[0].memory_gb
            return f"{len(self.gpus)}x {'/'.join(sorted(names))} ({per:g} GB each, {self.gpu_memory_gb:g} GB total)"
        return f"CPU only: {self.cpu_count} cores, {self.ram_gb:g} GB RAM ({self.available_ram_gb:g} GB available)"

    @classmethod
    def hypothetical(cls, gpu_memory_gb: float, num_gpus: int = 1) -> Hardware:
        """A machine to plan for: `num_gpus` GPUs of `gpu_memory_gb` each."""
        gpus = [GPU(name="hypothetical GPU", memory_gb=gpu_memory_gb) for _ in range(num_gpus)]
        return cls(gpus=gpus, source="hypothetical")


# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) by GPU name; the first match wins.
BF16_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("A100", 312e12),
                   ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12),
                   ("3090", 71e12), ("V100", 125e12), ("T4", 65e12))


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


def _nvidia_gpus() -> list[GPU]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append(GPU(name=name.strip(), memory_gb=round(float(mib) / 1024, 1)))
        except ValueError:
            continue
    return gpus


@lru_cache(maxsize=1)
def _gpus() -> tuple[GPU, ...]:
    return tuple([] if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else _nvidia_gpus())


def detect() -> Hardware:
    """Detect GPUs (NVIDIA, once per process) and RAM (now). Honors CUDA_VISIBLE_DEVICES=\"\" as 'no GPU'."""
    total, available = _meminfo()
    gpus = list(_gpus())
    return Hardware(
        gpus=gpus, ram_gb=round(total, 1), available_ram_gb=round(available, 1), cpu_count=os.cpu_count() or 1
    )
