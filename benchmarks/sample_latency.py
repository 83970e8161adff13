"""Sampling latency on the tiny model: cold first call, warm calls, a second adapter on the same base.

Builds a tiny model, trains a LoRA and a DoRA job (30 steps each) through the MCP tools, then
samples. Run: .venv/bin/python benchmarks/sample_latency.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client

from llm_mcp.demo import write_demo_dataset
from llm_mcp.server import AppState, build_server
from llm_mcp.settings import Settings, data_path

QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


async def timed(client, tool, args):
    t0 = time.perf_counter()
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return time.perf_counter() - t0, result.structured_content


async def main(home: Path) -> None:
    # In a subprocess: the cold sample below must pay for importing torch, as a fresh server does.
    subprocess.run([sys.executable, "-m", "llm_mcp", "make-tiny-model", str(home / "models" / "tiny")], check=True,
                   capture_output=True)
    write_demo_dataset(home / "data" / "demo.jsonl")
    state = AppState.load(Settings(home=home, models_path=data_path("models.yaml")))
    async with Client(build_server(state)) as client:
        jobs = {}
        for method in ("lora", "dora"):
            _, started = await timed(client, "start_finetune", {
                "model": "models/tiny", "method": method, "dataset": "data/demo.jsonl", "max_steps": 30,
                "learning_rate": 5e-3, "max_seq_len": 64})
            jobs[method] = started["job_id"]
            while (await timed(client, "job_status", {"job_id": jobs[method], "wait_seconds": 30}))[1]["job"][
                    "state"] not in ("succeeded", "failed"):
                pass
        args = {"job_id": jobs["lora"], "messages": QUESTION, "max_tokens": 16}
        cold, first = await timed(client, "sample", args)
        warm = [(await timed(client, "sample", args))[0] for _ in range(5)]
        swap, second = await timed(client, "sample", {**args, "job_id": jobs["dora"]})
        back, _ = await timed(client, "sample", args)
    print(json.dumps({
        "cold_first_sample_s": round(cold, 2), "cold_load_s": first["load_s"],
        "warm_sample_ms_median": round(statistics.median(warm) * 1000, 1),
        "new_adapter_on_loaded_base_ms": round(swap * 1000, 1), "new_adapter_load_s": second["load_s"],
        "base_reloaded_for_second_adapter": second["base_loaded"],
        "switch_back_to_cached_adapter_ms": round(back * 1000, 1), "tokens_per_s": first["tokens_per_s"],
    }, indent=2))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp))
