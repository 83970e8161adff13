"""bench sample: tokens/s for 32 prompts in-process and through vLLM (when installed), adapter swap time.

vLLM is measured on the same adapter: server start, runtime adapter load (with its probe check),
the 32 prompts one after another (as the in-process backend runs them) and all 32 at once.
"""

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
        state = AppState.load(Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers"))
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
        vllm = (_bench_vllm(state, jobs[0], [f"the cat sees item {i} and" for i in range(prompts)], max_tokens)
                if importlib.util.find_spec("vllm") else "not installed")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    results = {"benchmark": "sample", "prompts": prompts, "max_tokens": max_tokens,
               "transformers": {"tokens_per_s": round(tokens / elapsed, 1), "seconds": round(elapsed, 2),
                                "first_load_s": first.structured_content["load_s"]},
               "adapter_first_load_ms": round(statistics.median(swaps) * 1000, 1) if swaps else None,
               "adapter_switch_ms": round(statistics.median(switches) * 1000, 1),
               "vllm": vllm}
    base = results["transformers"]["tokens_per_s"]
    table = [["in-process (transformers), one at a time", base, results["transformers"]["seconds"], "1.00x"]]
    if isinstance(vllm, dict):
        table += [["vLLM, one at a time", vllm["sequential_tokens_per_s"], vllm["sequential_s"],
                   f"{vllm['sequential_tokens_per_s'] / base:.2f}x"],
                  [f"vLLM, {prompts} concurrent requests", vllm["concurrent_tokens_per_s"], vllm["concurrent_s"],
                   f"{vllm['concurrent_tokens_per_s'] / base:.2f}x"],
                  ["vLLM server start (s)", vllm["start_s"], "", ""],
                  ["vLLM runtime adapter load + probe check (s)", vllm["adapter_load_s"], "", ""]]
    else:
        table.append(["vLLM", vllm, "", ""])
    table += [
        ["in-process: load a second adapter on the loaded base (ms)", results["adapter_first_load_ms"], "", ""],
        ["in-process: switch to a cached adapter (ms)", results["adapter_switch_ms"], "", ""]]
    write_report(out, "sample", results, table,
                 ["backend / what", f"tokens/s ({prompts} prompts)", "seconds", "vs in-process"],
                 (["transformers"], [results["transformers"]["tokens_per_s"]], "tokens / s"))
    return results


def _bench_vllm(state: AppState, job_id: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from llm_mcp.adapters import job_adapter, job_target
    from llm_mcp.sampling import SampleParams
    from llm_mcp.serving.sampler import VllmSampler, adapter_config

    sampler = VllmSampler(state.pool, wait_s=600)
    target = job_target(state.store.get(job_id), job_adapter(state.store, state.store.get(job_id))[0])
    try:
        t0 = time.perf_counter()
        sampler.server(target, int(adapter_config(target.adapter_path)["r"]))  # sized for the adapter's rank
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampler.register(target, label=job_id)
        adapter_s = time.perf_counter() - t0

        def one(prompt: str) -> int:
            gen = sampler.generate(target, SampleParams(prompt=prompt, max_tokens=max_tokens), label=job_id)
            return gen.completions[0].completion_tokens

        one("warm up")
        t0 = time.perf_counter()
        seq_tokens = sum(one(p) for p in prompts)
        seq_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as ex:
            par_tokens = sum(ex.map(one, prompts))
        par_s = time.perf_counter() - t0
    finally:
        state.shutdown()
    return {"start_s": round(start_s, 1), "adapter_load_s": round(adapter_s, 2),
            "sequential_tokens_per_s": round(seq_tokens / seq_s, 1), "sequential_s": round(seq_s, 2),
            "concurrent_tokens_per_s": round(par_tokens / par_s, 1), "concurrent_s": round(par_s, 2),
            "checks": sampler.checks}
