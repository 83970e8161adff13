"""bench train (ours vs HF Trainer + PEFT) and bench methods (lora / qlora / dora / sparse).

Our side is what a client gets: `llm-mcp serve` in a subprocess over stdio, start_finetune and
job_status; the numbers come from metrics.jsonl in the job directory job_status names. The
baseline is a plain HF Trainer + PEFT script (hf_baseline.py) run in its own process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mcp import Client

from llm_mcp.bench.common import (build_model, job_numbers, median_of, mixed_length_data, run_job, server_params,
                                  wait_gone, write_report)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup(tiny: bool, rows: int) -> Path:
    home = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    build_model(home, tiny)
    mixed_length_data(home / "data" / "mixed.jsonl", rows, max_tokens=64 if tiny else 512)
    return home


def _job_args(steps: int, batch: int, tiny: bool, **extra: Any) -> dict[str, Any]:
    return {"model": "models/bench", "dataset": "data/mixed.jsonl", "max_steps": steps, "batch_size": batch,
            "learning_rate": 1e-3, "lora_rank": 16, "lora_dropout": 0.0, "max_seq_len": 64 if tiny else 512,
            "warmup_ratio": 0.0, "checkpoint_every": 0, "seed": 0, **extra}


def _baseline(home: Path, args: dict[str, Any]) -> dict[str, Any]:
    cfg = {"model": str(home / "models" / "bench"), "dataset": str(home / "data" / "mixed.jsonl"),
           "max_steps": args["max_steps"], "batch_size": args["batch_size"], "learning_rate": args["learning_rate"],
           "rank": args["lora_rank"], "alpha": args["lora_rank"], "dropout": args["lora_dropout"],
           "target_modules": TARGETS, "max_seq_len": args["max_seq_len"], "warmup_ratio": args["warmup_ratio"],
           "seed": args["seed"]}
    path = home / "baseline.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "llm_mcp.bench.hf_baseline", str(path)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the HF Trainer baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def bench_train(out: Path, reps: int, steps: int, batch: int, tiny: bool) -> dict[str, Any]:
    home = _setup(tiny, rows=max(256, steps * batch))
    ours, base = [], []
    try:
        async with Client(server_params(home)) as client:
            args = _job_args(steps, batch, tiny, method="lora")
            for rep in range(reps):  # alternate: ours, baseline, ours, baseline, ...
                job = await run_job(client, args)
                ours.append(job_numbers(job["job_dir"]))
                base.append(_baseline(home, args))
                print(f"rep {rep + 1}/{reps}: ours {ours[-1]['tokens_per_s']} tok/s, "
                      f"HF Trainer {base[-1]['tokens_per_s']} tok/s", flush=True)
    finally:
        wait_gone(home)
        shutil.rmtree(home, ignore_errors=True)
    o, b = {k: median_of(ours, k) for k in ("tokens_per_s", "peak_memory_mb", "final_loss", "train_s")}, \
        {k: median_of(base, k) for k in ("tokens_per_s", "peak_memory_mb", "final_loss", "train_s")}
    ratio = round(o["tokens_per_s"] / b["tokens_per_s"], 3)
    results = {"benchmark": "train", "model": "tiny" if tiny else "bench (23M Llama)", "steps": steps,
               "batch_size": batch, "reps": reps, "ours": o, "hf_trainer": b, "speedup": ratio,
               "memory_ratio": round(o["peak_memory_mb"] / b["peak_memory_mb"], 3), "runs": {"ours": ours, "hf": base}}
    table = [["llm_mcp job", o["tokens_per_s"], o["peak_memory_mb"], o["final_loss"], o["train_s"]],
             ["HF Trainer + PEFT", b["tokens_per_s"], b["peak_memory_mb"], b["final_loss"], b["train_s"]],
             ["ratio (ours / HF)", ratio, results["memory_ratio"], round(o["final_loss"] / b["final_loss"], 3),
              round(o["train_s"] / b["train_s"], 3)]]
    write_report(out, "train", results, table, ["path", "tokens/s", "peak MB", "final loss", "train s"],
                 (["llm_mcp", "HF Trainer"], [o["tokens_per_s"], b["tokens_per_s"]], "real tokens / s"))
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
                print(f"rep {rep + 1}/{reps}: " + ", ".join(f"{m} {r[-1]['step_s_median']} s/step"
                                                          for m, r in runs.items()), flush=True)
    finally:
        wait_gone(home)
        shutil.rmtree(home, ignore_errors=True)
    med = {m: {k: median_of(r, k) for k in ("step_s_median", "peak_memory_mb", "final_loss", "tokens_per_s")}
           | {"trainable_params": r[0]["trainable_params"]} for m, r in runs.items()}
    lora = med["lora"]
    for m in med:
        med[m]["time_ratio"] = round(med[m]["step_s_median"] / lora["step_s_median"], 3)
        med[m]["memory_ratio"] = round(med[m]["peak_memory_mb"] / lora["peak_memory_mb"], 3)
    results = {"benchmark": "methods", "steps": steps, "batch_size": batch, "reps": reps, "methods": med, "runs": runs}
    table = [[m, v["step_s_median"], v["time_ratio"], v["peak_memory_mb"], v["memory_ratio"], v["trainable_params"],
              v["final_loss"]] for m, v in med.items()]
    write_report(out, "methods", results, table,
                 ["method", "s/step", "time vs lora", "peak MB", "memory vs lora", "trainable", "final loss"],
                 (list(med), [v["time_ratio"] for v in med.values()], "time per step / LoRA"))
    return results
