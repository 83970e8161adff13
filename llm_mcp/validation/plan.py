"""A resolved job's plan: memory (refused with what would fit when it does not), steps, tokens and time."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llm_mcp.core.data import DatasetSummary
from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.estimates import RAM_USABLE_FRACTION
from llm_mcp.core.fit import plan_memory
from llm_mcp.core.hardware import Hardware, gpu_bf16_peak_flops
from llm_mcp.core.matrix import ModelEntry
from llm_mcp.core.methods import METHODS, Method
from llm_mcp.core.methods.defaults import MethodDefaults
from llm_mcp.core.objectives import Objective
from llm_mcp.core.throughput import TimeEstimate, device_kind
from llm_mcp.core.throughput import estimate as estimate_time


def plan(
    cfg: dict[str, Any],
    method: Method,
    objective: Objective,
    defaults: MethodDefaults,
    entry: ModelEntry,
    dataset: DatasetSummary,
    hardware: Hardware,
    requested: tuple[int | None, bool | None],
    warnings: list[str],
    home: Path,
) -> dict[str, Any]:
    """The job's estimates; sets the config's gradient_checkpointing, distributed and num_processes.

    `requested`: the caller's (num_processes, gradient_checkpointing), None where left to the plan.

    Raises:
        InvalidArgumentError: the job does not fit (with settings that would), or has too few rows for one step.
    """
    sparse = cfg["sparse"]
    num_processes, gradient_checkpointing = requested
    memory = plan_memory(
        entry,
        method,
        hardware,
        target_modules=cfg["lora"]["target_modules"],
        rank=cfg["lora"]["rank"],
        dropout=cfg["lora"]["dropout"],
        train_experts=bool(cfg["lora"].get("target_parameters")),
        batch_size=cfg["batch_size"] * objective.sequences(cfg),
        seq_len=cfg["max_seq_len"],
        quantized=cfg["quantization"] is not None,
        density=method.estimate_density(sparse, defaults),
        rigl_fraction=method.rigl_fraction(sparse, defaults),
        num_processes=num_processes,
        gradient_checkpointing=gradient_checkpointing,
    )
    est, usable = memory.estimate, memory.usable_gb
    cfg.update(
        gradient_checkpointing=memory.gradient_checkpointing,
        distributed=memory.distributed,
        num_processes=memory.processes,
    )
    if not memory.fits:
        raise InvalidArgumentError(
            [
                f"estimated memory {est.total_gb:g} GB per process exceeds the {usable:g} GB usable on "
                f"{hardware.describe()} by one process"
            ]
            + _fitting_alternatives(entry, method, cfg, hardware)
        )
    warnings += _memory_warnings(entry, memory, cfg.get("nodes") or 1, hardware)
    eval_rows = int(dataset.rows * cfg["eval_fraction"]) if cfg["eval_fraction"] else 0
    train_rows = dataset.rows - eval_rows
    per_step = cfg["batch_size"] * cfg["gradient_accumulation"] * cfg["num_processes"]
    if train_rows < per_step:
        raise InvalidArgumentError(
            f"dataset has {train_rows} training rows, but one step needs batch_size x gradient_accumulation x "
            f"num_processes = {per_step}; lower batch_size or add data"
        )
    steps_per_epoch = train_rows // per_step
    total_steps = cfg["max_steps"] or max(1, math.ceil(cfg["epochs"] * steps_per_epoch))
    if cfg.get("resume_checkpoint"):
        done = cfg["resume_step"]
        if total_steps <= done:
            raise InvalidArgumentError(
                f"max_steps={total_steps} is not past the checkpoint at step {done} of {cfg['resume_from']!r}; "
                f"give max_steps > {done} (or omit it to keep the original run's length)"
            )
    tokens_per_row = max(1, min(dataset.approx_tokens // max(1, dataset.rows), cfg["max_seq_len"]))
    tokens = total_steps * per_step * tokens_per_row
    work = entry.active_params_b * 1e9 * per_step * tokens_per_row * objective.flops_factor
    timing = _time(home, hardware, total_steps, work, cfg["num_processes"])
    if not dataset.complete:
        warnings.append(f"validated the first {dataset.rows} rows within the time budget; the job checks the rest")
    return {
        "trainable_params": est.trainable_params,
        "memory_gb": est.total_gb,
        "memory": est.to_dict(),
        "usable_memory_gb": usable,
        "hardware": hardware.describe(),
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "approx_tokens": tokens,
        "rough_time_s": timing.seconds,
        "time_basis": f"{timing.basis}: {timing.startup_s:g} s to start, {timing.step_s:g} s a step",
        "dataset_formats": dataset.formats,
    }


def _fitting_alternatives(entry: ModelEntry, method: Method, cfg: dict[str, Any], hw: Hardware) -> list[str]:
    """Suggest a method / rank / batch / sequence length that fits `hw`, if any does (QLoRA's 4-bit base first)."""
    rank, batch, seq = cfg["lora"]["rank"], cfg["batch_size"], cfg["max_seq_len"]
    short = min(512, seq)
    four_bit = next(m for m in METHODS.values() if m.quantized_base)  # QLoRA: the smallest footprint
    candidates = [
        (f"method={four_bit.name!r}", four_bit, rank, batch, seq),
        ("batch_size=1", method, rank, 1, seq),
        (f"max_seq_len={short}, batch_size=1", method, rank, 1, short),
        (f"method={four_bit.name!r}, batch_size=1, max_seq_len={short}", four_bit, rank, 1, short),
        (f"method={four_bit.name!r}, lora_rank=8, batch_size=1, max_seq_len=256", four_bit, 8, 1, 256),
    ]
    out = []
    for label, m, r, b, s in candidates:
        if m is method and (r, b, s) == (rank, batch, seq):
            continue
        if entry.methods[m.name].status == "unsupported":
            continue
        fit = plan_memory(entry, m, hw, target_modules=cfg["lora"]["target_modules"], rank=r, batch_size=b, seq_len=s,
                          dropout=cfg["lora"]["dropout"])  # fmt: skip
        if fit.fits:
            how = f", FSDP over {fit.processes} GPUs" if fit.distributed == "fsdp" else ""
            out.append(f"would fit: {label} (estimated {fit.estimate.total_gb:g} GB per process{how})")
            break
    if not out:
        need = entry.methods[four_bit.name].min_gpu_memory_gb
        out.append(
            f"no smaller setting fits; {entry.id} needs about {need:g} GB of GPU memory with {four_bit.short}. "
            "Call list_models(fits=true) for models that fit this machine"
        )
    return out


def _check_host_ram(entry: ModelEntry, processes: int, nodes: int, hardware: Hardware) -> None:
    """FSDP: transformers 5 materializes a full-size CPU copy of the weights in every rank on a node before FSDP
    shards them (zeros on ranks > 0, broadcast from rank 0): the node's RAM must hold one per rank.

    Raises:
        InvalidArgumentError: it cannot.
    """
    if not hardware.ram_gb:
        return
    ranks = max(1, processes // max(1, nodes))
    host_gb = ranks * entry.params_b * 1e9 * 2 / 2**30
    if host_gb > RAM_USABLE_FRACTION * hardware.ram_gb:
        raise InvalidArgumentError(
            f"loading {entry.id} for FSDP needs about {host_gb:.0f} GB of host RAM on each node ({ranks} ranks x "
            f"{entry.params_b:g}B parameters in bf16: every rank builds a full-size copy before sharding), but "
            f"this machine has {hardware.ram_gb:.0f} GB. Next: fewer processes per node (num_processes with "
            f"nodes on a cluster), a smaller model, or method='qlora'"
        )


def _time(home: Path, hardware: Hardware, steps: int, work: float, processes: int) -> TimeEstimate:
    """The job's wall time from this machine's finished jobs (llm_mcp.core.throughput)."""
    kind = device_kind(hardware.device, hardware.gpus[0].name if hardware.gpus else "", hardware.cpu_count)
    peak = 0.3 * gpu_bf16_peak_flops(hardware.gpus[0].name) * processes if hardware.gpus else None
    return estimate_time(home, kind, steps, work, peak)


def _memory_warnings(entry: ModelEntry, memory: Any, nodes: int, hardware: Hardware) -> list[str]:
    """What the caller should know about the memory plan (FSDP, memory others hold now); an FSDP job whose node
    cannot hold the weights once per rank is refused (_check_host_ram)."""
    est, out = memory.estimate, []
    if memory.distributed == "fsdp":
        _check_host_ram(entry, memory.processes, nodes, hardware)
        out.append(
            f"{entry.id} does not fit one GPU: the job runs FSDP over {memory.processes} GPUs "
            f"(weights and optimizer state sharded, about {est.total_gb:g} GB per GPU)"
        )
    free = hardware.free_gb()
    if hardware.source == "detected" and free is not None and est.total_gb > free:
        out.append(
            f"the job needs about {est.total_gb:g} GB per process but only {free:g} GB of "
            f"{'GPU memory' if hardware.gpus else 'RAM'} is free right now; it may "
            f"{'run out of memory' if hardware.gpus else 'swap or be killed'} unless other programs free memory"
        )
    return out
