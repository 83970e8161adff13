"""bench sample: tokens/s for 32 prompts in-process (vLLM when installed), adapter hot-swap time."""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp import Client

from llm_mcp.bench.common import build_model, mixed_length_data, run_job, write_report
from llm_mcp.server import AppState, build_server
from llm_mcp.settings import Settings, data_path


async def bench_sample(out: Path, prompts: int, max_tokens: int, tiny: bool) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    try:
        build_model(home, tiny)
        mixed_length_data(home / "data" / "mixed.jsonl", 64, max_tokens=64)
        state = AppState.load(Settings(home=home, models_path=data_path("models.yaml")))
        async with Client(build_server(state)) as client:
            train = {"model": "models/bench", "dataset": "data/mixed.jsonl", "max_steps": 5, "max_seq_len": 64,
                     "checkpoint_every": 0}
            jobs = [await run_job(client, {**train, "method": m}) for m in ("lora", "dora")]
            args = {"job_id": jobs[0], "max_tokens": max_tokens}
            first = await client.call_tool("sample", {**args, "prompt": "warm up"})
            tokens, t0 = 0, time.perf_counter()
            for i in range(prompts):
                r = await client.call_tool("sample", {**args, "prompt": f"the cat sees item {i} and"})
                tokens += r.structured_content["completions"][0]["completion_tokens"]
            elapsed = time.perf_counter() - t0
            swaps, switches = [], []
            for _ in range(3):
                for job in (jobs[1], jobs[0]):
                    t1 = time.perf_counter()
                    r = await client.call_tool("sample", {"job_id": job, "prompt": "hi", "max_tokens": 1})
                    (swaps if r.structured_content["adapter_loaded"] else switches).append(time.perf_counter() - t1)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    results = {"benchmark": "sample", "prompts": prompts, "max_tokens": max_tokens,
               "transformers": {"tokens_per_s": round(tokens / elapsed, 1), "seconds": round(elapsed, 2),
                                "first_load_s": first.structured_content["load_s"]},
               "adapter_first_load_ms": round(statistics.median(swaps) * 1000, 1) if swaps else None,
               "adapter_switch_ms": round(statistics.median(switches) * 1000, 1),
               "vllm": "not installed" if importlib.util.find_spec("vllm") is None else "installed, not benchmarked yet"}
    table = [["in-process (transformers)", results["transformers"]["tokens_per_s"], results["transformers"]["seconds"]],
             ["vLLM", results["vllm"], ""],
             ["load a second adapter on the loaded base (ms)", results["adapter_first_load_ms"], ""],
             ["switch to a cached adapter (ms)", results["adapter_switch_ms"], ""]]
    write_report(out, "sample", results, table, ["backend / what", f"tokens/s ({prompts} prompts)", "seconds"],
                 (["transformers"], [results["transformers"]["tokens_per_s"]], "tokens / s"))
    return results
