"""Does a job fit this machine, and how: the one rule start_finetune and list_models(fits=...) share.

Data parallel (DDP, and a single process) keeps a whole replica in every process, so it fits when
one process's estimate fits one device (on a CPU-only machine: all processes' estimates fit the RAM
they share). A job that does not fit one GPU may still fit as FSDP over several GPUs: weights and
optimizer state are sharded, activations stay per process; only then does the machine's total count.
Only methods whose `fsdp` is set (LoRA, DoRA; llm_mcp.train.fsdp) are sharded: 4-bit bases (QLoRA, sparse
over NF4) need a bitsandbytes quant-storage dtype FSDP can flatten, and sparse deltas' custom backward
re-reads the base weight; neither is wired.

Gradient checkpointing, when the caller leaves it open, is off if the job fits without it (faster)
and on otherwise; the estimate returned is always the one for the decision taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llm_mcp.core.estimates import MemoryEstimate, estimate_memory
from llm_mcp.core.hardware import Hardware
from llm_mcp.core.matrix import ModelEntry
from llm_mcp.core.methods import Method, get_method


@dataclass(frozen=True)
class Plan:
    estimate: MemoryEstimate  # per process
    gradient_checkpointing: bool
    distributed: Literal["ddp", "fsdp"]  # ddp: whole replica per process (also a single process)
    processes: int
    fits: bool
    usable_gb: float  # what one process may use (per GPU, or the RAM share of each CPU process)


# Checkpointing is switched off only when the estimate without it leaves this fraction of the memory free: an
# estimate is a plan, and running out of memory costs the whole job.
CHECKPOINTING_MARGIN = 0.15


def plan_memory(
    entry: ModelEntry,
    method: str | Method,
    hardware: Hardware,
    *,
    target_modules: list[str],
    rank: int,
    batch_size: int,
    seq_len: int,
    dropout: float = 0.0,
    quantized: bool = False,
    density: float | str = "auto",
    rigl_fraction: float = 0.0,
    num_processes: int | None = None,
    gradient_checkpointing: bool | None = None,
    train_experts: bool = True,
) -> Plan:
    """The cheapest way to run this job on `hardware` that fits, else the smallest estimate with fits=False.

    `num_processes` None: one process, unless only FSDP over all GPUs fits.
    """
    method = method if isinstance(method, Method) else get_method(method)
    device: Literal["cuda", "cpu"] = "cuda" if hardware.gpus else "cpu"
    procs = num_processes or 1
    choices = [False, True] if gradient_checkpointing is None else [gradient_checkpointing]
    per_process = hardware.usable_gb() if hardware.gpus else hardware.usable_gb() / procs

    def estimate(gc: bool, shards: int = 1) -> MemoryEstimate:
        return estimate_memory(
            entry.dims,
            entry.params_b,
            method,
            target_modules=target_modules,
            rank=rank,
            dropout=dropout,
            batch_size=batch_size,
            seq_len=seq_len,
            device=device,
            quantized=quantized,
            density=density,
            gradient_checkpointing=gc,
            shards=shards,
            rigl_fraction=rigl_fraction,
            train_experts=train_experts,
        )

    def budget(gc: bool) -> float:
        """The memory a plan may fill: all of it with checkpointing (or when the caller turned it off), less the
        margin when the plan itself would turn it off."""
        return per_process if gc or gradient_checkpointing is False else per_process * (1 - CHECKPOINTING_MARGIN)

    for gc in choices:
        est = estimate(gc)
        if est.total_gb <= budget(gc):
            return Plan(est, gc, "ddp", procs, True, per_process)
    shards = num_processes or len(hardware.gpus)
    if device == "cuda" and shards > 1 and method.fsdp and not quantized:
        for gc in choices:
            est = estimate(gc, shards)
            if est.total_gb <= budget(gc):
                return Plan(est, gc, "fsdp", shards, True, per_process)
    return Plan(estimate(choices[-1]), choices[-1], "ddp", procs, False, per_process)
