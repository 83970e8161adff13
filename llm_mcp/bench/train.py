"""bench train (ours vs HF Trainer + PEFT, + TRL SFTTrainer on GPU) and bench methods (lora / qlora / dora / sparse).

Our side is what a client gets: `llm-mcp serve` in a subprocess over stdio, start_finetune and
job_status; the numbers come from metrics.jsonl in the job directory job_status names. The
baselines are a plain HF Trainer + PEFT script (hf_baseline.py) and, with `--device cuda` when TRL
is installed, TRL's SFTTrainer with padding-free packing (trl_baseline.py), each in its own process.
`bench train` measures two workload shapes (workloads.py); on GPU it adds MFU and our memory
estimate (start_finetune's dry run) against the measured peak.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mcp import Client

from llm_mcp.bench.common import (
    build_model,
    call,
    job_numbers,
    median_of,
    mixed_length_data,
    run_job,
    server_params,
    wait_gone,
    write_report,
)
from llm_mcp.bench.workloads import Workload, workloads, write_data

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LABELS = {"ours": "llm_mcp job", "hf_trainer": "HF Trainer + PEFT", "trl_sft": "TRL SFTTrainer (packed, padding-free)"}


def _setup(tiny: bool, rows: int) -> Path:
    home = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    build_model(home, tiny)
    mixed_length_data(home / "data" / "mixed.jsonl", rows, max_tokens=64 if tiny else 512)
    return home


def _job_args(steps: int, batch: int, tiny: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": "models/bench",
        "dataset": "data/mixed.jsonl",
        "max_steps": steps,
        "batch_size": batch,
        "learning_rate": 1e-3,
        "lora_rank": 16,
        "lora_dropout": 0.0,
        "max_seq_len": 64 if tiny else 512,
        "warmup_ratio": 0.0,
        "checkpoint_every": 0,
        "seed": 0,
        **extra,
    }


def _baseline(home: Path, args: dict[str, Any], module: str = "hf_baseline") -> dict[str, Any]:
    """Run a baseline script (hf_baseline / trl_baseline) in its own process on the job's settings."""
    cfg = {
        "model": str(home / args["model"]),
        "dataset": str(home / args["dataset"]),
        "max_steps": args["max_steps"],
        "batch_size": args["batch_size"],
        "learning_rate": args["learning_rate"],
        "rank": args["lora_rank"],
        "alpha": args["lora_rank"],
        "dropout": args["lora_dropout"],
        "target_modules": TARGETS,
        "max_seq_len": args["max_seq_len"],
        "warmup_ratio": args["warmup_ratio"],
        "seed": args["seed"],
    }
    path = home / f"{module}.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", f"llm_mcp.bench.{module}", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {module} baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _params(model_dir: Path) -> int:
    """Parameters stored in the model's safetensors files (read from their headers, no torch)."""
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _paths(device: str) -> list[str]:
    """What each workload runs: our job and the HF Trainer; on a GPU also TRL's SFTTrainer when installed."""
    import importlib.util

    with_trl = device == "cuda" and importlib.util.find_spec("trl") is not None
    if device == "cuda" and not with_trl:
        print("TRL is not installed (pip install 'llm-mcp[bench]'): the SFTTrainer baseline is skipped", flush=True)
    return ["ours", "hf_trainer"] + (["trl_sft"] if with_trl else [])


async def _workload(
    client, home: Path, w: Workload, reps: int, steps: int, batch: int, paths: list[str], device: str
) -> dict[str, Any]:
    """One workload: every path `reps` times, alternating; medians, ratios to the HF Trainer, MFU on GPU."""
    build_model(home, False, w.name, w.model)
    write_data(w, home / "data" / f"{w.name}.jsonl", rows=max(256, steps * batch))
    args = {
        **_job_args(steps, batch, False, method="lora"),
        "model": f"models/{w.name}",
        "dataset": f"data/{w.name}.jsonl",
        "max_seq_len": w.max_tokens,
    }
    estimate = (await call(client, "start_finetune", {**args, "dry_run": True}))["estimates"]["memory_gb"]
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for rep in range(reps):
        for p in paths:
            runs[p].append(
                job_numbers((await run_job(client, args))["job_dir"])
                if p == "ours"
                else _baseline(home, args, "hf_baseline" if p == "hf_trainer" else "trl_baseline")
            )
        print(
            f"{w.name} rep {rep + 1}/{reps}: "
            + ", ".join(f"{p} {r[-1]['tokens_per_s']} tok/s" for p, r in runs.items()),
            flush=True,
        )
    keys = ("tokens_per_s", "peak_memory_mb", "final_loss", "train_s")
    med = {p: {k: median_of(r, k) for k in keys} for p, r in runs.items()}
    n_params = _params(home / "models" / w.name)
    for m in med.values():
        m["speed_vs_hf"] = round(m["tokens_per_s"] / med["hf_trainer"]["tokens_per_s"], 3)
        m["memory_vs_hf"] = round(m["peak_memory_mb"] / med["hf_trainer"]["peak_memory_mb"], 3)
        if device == "cuda":  # LoRA: forward 2N + backward through activations 2N, no weight gradients
            m["mfu"] = round(4 * n_params * m["tokens_per_s"] / _gpu_peak(), 4)
    med["ours"]["estimate_gb"] = estimate
    med["ours"]["estimate_vs_measured"] = round(estimate * 1024 / med["ours"]["peak_memory_mb"], 3)
    return {"description": w.description, "params": n_params, "max_seq_len": w.max_tokens, "paths": med, "runs": runs}


def _gpu_peak() -> float:
    import subprocess as sp

    from llm_mcp.core.hardware import gpu_bf16_peak_flops

    name = sp.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout
    return gpu_bf16_peak_flops(name.splitlines()[0] if name else "")


async def bench_train(
    out: Path, reps: int, steps: int, batch: int, tiny: bool, device: str = "cpu", only: str | None = None
) -> dict[str, Any]:
    """Each workload shape (workloads.py; `only`: one of them): our LoRA job against the plain HF Trainer
    (+ TRL SFTTrainer on GPU)."""
    home = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    paths = _paths(device)
    results: dict[str, Any] = {
        "benchmark": "train",
        "device": device,
        "steps": steps,
        "batch_size": batch,
        "reps": reps,
        "workloads": {},
    }
    try:
        async with Client(server_params(home)) as client:
            for w in [w for w in workloads(device, tiny) if only in (None, w.name)]:
                results["workloads"][w.name] = await _workload(client, home, w, reps, steps, batch, paths, device)
    finally:
        wait_gone(home)
        shutil.rmtree(home, ignore_errors=True)
    headers = ["workload", "path", "tokens/s", "speed vs HF", "peak MB", "memory vs HF", "final loss", "train s"]
    headers += ["MFU", "estimate GB"] if device == "cuda" else []
    table = []
    for name, r in results["workloads"].items():
        for p, m in r["paths"].items():
            table.append(
                [
                    name,
                    LABELS[p],
                    m["tokens_per_s"],
                    m["speed_vs_hf"],
                    m["peak_memory_mb"],
                    m["memory_vs_hf"],
                    m["final_loss"],
                    m["train_s"],
                ]
                + ([m["mfu"], m.get("estimate_gb", "")] if device == "cuda" else [])
            )
    write_report(
        out,
        "train",
        results,
        table,
        headers,
        (
            [f"{n}\n{LABELS[p]}" for n, r in results["workloads"].items() for p in r["paths"]],
            [m["speed_vs_hf"] for r in results["workloads"].values() for m in r["paths"].values()],
            "tokens/s vs HF Trainer",
        ),
    )
    return results


async def bench_methods(out: Path, reps: int, steps: int, batch: int, tiny: bool) -> dict[str, Any]:
    home = _setup(tiny, rows=max(256, steps * batch))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ("lora", "qlora", "dora", "sparse")}
    try:
        async with Client(server_params(home)) as client:
            for rep in range(reps):
                for method in runs:
                    job = await run_job(client, _job_args(steps, batch, tiny, method=method))
                    runs[method].append(job_numbers(job["job_dir"]))
                print(
                    f"rep {rep + 1}/{reps}: "
                    + ", ".join(f"{m} {r[-1]['step_s_median']} s/step" for m, r in runs.items()),
                    flush=True,
                )
    finally:
        wait_gone(home)
        shutil.rmtree(home, ignore_errors=True)
    med = {
        m: {k: median_of(r, k) for k in ("step_s_median", "peak_memory_mb", "final_loss", "tokens_per_s")}
        | {"trainable_params": r[0]["trainable_params"]}
        for m, r in runs.items()
    }
    lora = med["lora"]
    for m in med:
        med[m]["time_ratio"] = round(med[m]["step_s_median"] / lora["step_s_median"], 3)
        med[m]["memory_ratio"] = round(med[m]["peak_memory_mb"] / lora["peak_memory_mb"], 3)
    results = {"benchmark": "methods", "steps": steps, "batch_size": batch, "reps": reps, "methods": med, "runs": runs}
    table = [
        [
            m,
            v["step_s_median"],
            v["time_ratio"],
            v["peak_memory_mb"],
            v["memory_ratio"],
            v["trainable_params"],
            v["final_loss"],
        ]
        for m, v in med.items()
    ]
    write_report(
        out,
        "methods",
        results,
        table,
        ["method", "s/step", "time vs lora", "peak MB", "memory vs lora", "trainable", "final loss"],
        (list(med), [v["time_ratio"] for v in med.values()], "time per step / LoRA"),
    )
    return results
