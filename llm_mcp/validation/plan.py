"""A resolved job's plan: memory (refused with what would fit when it does not), steps, tokens and time."""

from __future__ import annotations

import math
from typing import Any

from llm_mcp.core.data import DatasetSummary
from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.fit import plan_memory
from llm_mcp.core.hardware import Hardware, gpu_bf16_peak_flops
from llm_mcp.core.matrix import ModelEntry
from llm_mcp.core.methods import METHODS, Method
from llm_mcp.core.methods.defaults import MethodDefaults
from llm_mcp.core.objectives import Objective


def _flops_per_second(hardware: Hardware, processes: int) -> float:
    """Rough sustained training FLOP/s, for the time estimate only."""
    if not hardware.gpus:
        return 1e10 * max(1, hardware.cpu_count)
    return 0.3 * gpu_bf16_peak_flops(hardware.gpus[0].name) * processes


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
        train_experts=bool(cfg["lora"].get("target_parameters")),
        batch_size=cfg["batch_size"] * objective.sequences_per_row,
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
    if memory.distributed == "fsdp":
        warnings.append(
            f"{entry.id} does not fit one GPU: the job runs FSDP over {memory.processes} GPUs "
            f"(weights and optimizer state sharded, about {est.total_gb:g} GB per GPU)"
        )
    free = hardware.free_gb()
    if hardware.source == "detected" and free is not None and est.total_gb > free:
        warnings.append(
            f"the job needs about {est.total_gb:g} GB per process but only {free:g} GB of "
            f"{'GPU memory' if hardware.gpus else 'RAM'} is free right now; it may "
            f"{'run out of memory' if hardware.gpus else 'swap or be killed'} unless other programs free memory"
        )
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
    flops_per_token = 4 * entry.active_params_b * 1e9 * objective.flops_factor
    seconds = flops_per_token * tokens / _flops_per_second(hardware, cfg["num_processes"])
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
        "rough_time_s": round(seconds + 15, 1),
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
        fit = plan_memory(entry, m, hw, target_modules=cfg["lora"]["target_modules"], rank=r, batch_size=b, seq_len=s)
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
