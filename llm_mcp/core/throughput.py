"""Time estimates from this machine's own jobs: how long a job takes to start and each step to run.

A FLOP count alone misses what dominates small jobs: starting (accelerate, imports, the model load: ~10 s on a
2-core CPU) and each step's fixed overhead.
Every job that ends well records, per device kind, the time outside its steps (start-up, final eval, saving) and
its step time with the work per step (parameters x tokens); a dry run then scales the nearest recorded job to the
new one. Before any job has run on a device kind the defaults below are used (CPU: measured with tiny-model
jobs on this project's 2-core machines, ~10 s to start and 40 GFLOP/s; GPU: 30% of the card's bf16 peak and a
start-up guess, not measured), and the estimate says which basis it has. A running job's ETA comes from its own
steps (llm_mcp.jobs.status).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mcp.core import atomic

RECORD = "throughput.json"
KEEP = 20  # jobs kept per device kind
# (start-up seconds, seconds per step of no work, FLOP/s) before this machine has run a job of its kind
DEFAULTS = {"cpu": (12.0, 0.005, 3.0e10), "cuda": (45.0, 0.05, 2.0e14)}  # cuda: FLOP/s from the GPU's peak instead


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float
    startup_s: float
    step_s: float
    basis: str


def device_kind(device: str, name: str, cores: int) -> str:
    """What a job's speed depends on besides its own shape: the GPU model, or the CPU's usable cores."""
    return f"cuda:{name}" if device == "cuda" else f"cpu:{cores}"


def _load(home: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        data = json.loads((home / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(home: Path, kind: str, startup_s: float, step_s: float, work: float) -> None:
    """Remember one finished job on `kind` (`work`: parameters x tokens per optimizer step)."""
    if not (startup_s > 0 and step_s > 0 and work > 0):
        return
    data = _load(home)
    entries = [e for e in data.get(kind, []) if isinstance(e, dict)][-(KEEP - 1) :]
    entries.append({"startup_s": round(startup_s, 2), "step_s": round(step_s, 4), "work": work, "at": time.time()})
    data[kind] = entries
    try:
        atomic.replace(home / RECORD, json.dumps(data, indent=1).encode())
    except OSError:
        pass  # an estimate's history is worth less than the job that wrote it


def estimate(home: Path, kind: str, steps: int, work: float, flops: float | None = None) -> TimeEstimate:
    """The wall time of a job of `steps` steps of `work` (parameters x tokens per step) on `kind`; `flops`: the
    sustained FLOP/s to assume before any job has been measured (default: DEFAULTS)."""
    device = kind.split(":", 1)[0]
    startup, overhead, default_flops = DEFAULTS.get(device, DEFAULTS["cpu"])
    flops = flops or default_flops
    entries = [e for e in _load(home).get(kind, []) if isinstance(e, dict) and e.get("work", 0) > 0]
    if entries:
        # the recorded job nearest in work, scaled: its fixed part kept, its arithmetic grown with the work
        near = min(entries, key=lambda e: abs(math.log(e["work"] / work)))
        arithmetic = min(near["step_s"], 6 * near["work"] / flops)
        step = near["step_s"] - arithmetic + arithmetic * work / near["work"]
        startup = statistics.median(e["startup_s"] for e in entries)
        basis = f"measured: {len(entries)} earlier job(s) on this machine ({kind})"
    else:
        step = overhead + 6 * work / flops
        basis = f"defaults for {device} (no job has finished on this machine yet)"
    return TimeEstimate(round(startup + steps * step, 1), round(startup, 1), round(step, 4), basis)
