"""bench sample: tokens/s for 32 prompts with the in-process backend and through vLLM (when installed),
adapter swap time.

Everything goes through what a client has: `llm-mcp serve` subprocesses over stdio and their tools.
In-process: a server with `--sampler transformers`; the `sample` tool, one prompt at a time, and
switching between two jobs' adapters. vLLM: a second server with `--sampler vllm`; `serve_adapter`
is called until it answers 'ready' (vLLM start, runtime adapter load and its probe check), then the
32 prompts go to the returned OpenAI-compatible URL one after another and all at once (httpx), as
an application using the served adapter would send them. Serving a second adapter on the running
vLLM server times a runtime adapter load with its probe check.
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

from llm_mcp.bench.common import build_model, call, mixed_length_data, run_job, server_params, wait_gone, write_report

VLLM_READY_TIMEOUT_S = 900.0  # serve_adapter until 'ready', in all
SERVE_CALL_TIMEOUT_S = 300.0  # one serve_adapter call (it answers within ~25 s when the server is healthy)


async def bench_sample(out: Path, prompts: int, max_tokens: int, tiny: bool, vllm: bool = True) -> dict[str, Any]:
    backend: dict[str, Any] | str
    home = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    with_vllm = vllm and importlib.util.find_spec("vllm") is not None
    texts = [f"the cat sees item {i} and" for i in range(prompts)]
    try:
        build_model(home, tiny)
        mixed_length_data(home / "data" / "mixed.jsonl", 64, max_tokens=64)
        async with Client(server_params(home, "transformers")) as client:
            train = {
                "model": "models/bench",
                "dataset": "data/mixed.jsonl",
                "max_steps": 5,
                "max_seq_len": 64,
                "checkpoint_every": 0,
            }
            jobs = [(await run_job(client, {**train, "method": m}))["job_id"] for m in ("lora", "dora")]
            if with_vllm:  # a second LoRA adapter on the same base: a runtime adapter load on a running vLLM
                jobs.append((await run_job(client, {**train, "method": "lora", "seed": 1}))["job_id"])
            args = {"job_id": jobs[0], "max_tokens": max_tokens}
            first = await call(client, "sample", {**args, "prompt": "warm up"})
            tokens, t0 = 0, time.perf_counter()
            for text in texts:
                r = await call(client, "sample", {**args, "prompt": text})
                tokens += r["completions"][0]["completion_tokens"]
            elapsed = time.perf_counter() - t0
            swaps: list[float] = []
            switches: list[float] = []
            for _ in range(3):
                for job in (jobs[1], jobs[0]):
                    t1 = time.perf_counter()
                    r = await call(client, "sample", {"job_id": job, "prompt": "hi", "max_tokens": 1})
                    (swaps if r["adapter_loaded"] else switches).append(time.perf_counter() - t1)
        backend = (
            await _bench_vllm(home, jobs[0], jobs[2], texts, max_tokens)
            if with_vllm
            else "not installed"
            if vllm
            else "skipped (--no-vllm)"
        )
    finally:
        wait_gone(home)
        shutil.rmtree(home, ignore_errors=True)
    results: dict[str, Any] = {
        "benchmark": "sample",
        "prompts": prompts,
        "max_tokens": max_tokens,
        "transformers": {
            "tokens_per_s": round(tokens / elapsed, 1),
            "seconds": round(elapsed, 2),
            "first_load_s": first["load_s"],
        },
        "adapter_first_load_ms": round(statistics.median(swaps) * 1000, 1) if swaps else None,
        "adapter_switch_ms": round(statistics.median(switches) * 1000, 1),
        "vllm": backend,
    }
    base = results["transformers"]["tokens_per_s"]
    table = [
        ["in-process (transformers), sample tool, one at a time", base, results["transformers"]["seconds"], "1.00x"]
    ]
    if isinstance(backend, dict):
        table += [
            [
                "vLLM (serve_adapter URL), one at a time",
                backend["sequential_tokens_per_s"],
                backend["sequential_s"],
                f"{backend['sequential_tokens_per_s'] / base:.2f}x",
            ],
            [
                f"vLLM (serve_adapter URL), {prompts} concurrent requests",
                backend["concurrent_tokens_per_s"],
                backend["concurrent_s"],
                f"{backend['concurrent_tokens_per_s'] / base:.2f}x",
            ],
            ["vLLM: serve_adapter until ready (server start + adapter load + probe check, s)", backend["start_s"]]
            + ["", ""],
            ["vLLM: serve_adapter of a second adapter (runtime load + probe check, s)", backend["adapter_load_s"]]
            + ["", ""],
        ]
    else:
        table.append(["vLLM", vllm, "", ""])
    table += [
        ["in-process: load a second adapter on the loaded base (ms)", results["adapter_first_load_ms"], "", ""],
        ["in-process: switch to a cached adapter (ms)", results["adapter_switch_ms"], "", ""],
    ]
    write_report(
        out,
        "sample",
        results,
        table,
        ["backend / what", f"tokens/s ({prompts} prompts)", "seconds", "vs in-process"],
        (["transformers"], [results["transformers"]["tokens_per_s"]], "tokens / s"),
    )
    return results


async def _serve(client, job_id: str) -> tuple[dict[str, Any], float]:
    """serve_adapter(job_id) until its state is 'ready' (it answers 'starting' / 'merging' meanwhile)."""
    t0 = time.perf_counter()
    while True:
        served = await call(client, "serve_adapter", {"job_id": job_id}, timeout_s=SERVE_CALL_TIMEOUT_S)
        if served["state"] == "ready":
            return served, time.perf_counter() - t0
        if time.perf_counter() - t0 > VLLM_READY_TIMEOUT_S:
            raise RuntimeError(f"serve_adapter({job_id}) not ready after {VLLM_READY_TIMEOUT_S:g} s: {served}")


async def _bench_vllm(
    home: Path, job_id: str, second_job_id: str, prompts: list[str], max_tokens: int
) -> dict[str, Any]:
    import anyio
    import httpx

    async with Client(server_params(home, "vllm")) as client:
        served, start_s = await _serve(client, job_id)
        second, adapter_s = await _serve(client, second_job_id)
        headers = {"Authorization": f"Bearer {served['api_key']}"} if served.get("api_key") else {}
        async with httpx.AsyncClient(base_url=served["url"], headers=headers, timeout=600) as http:

            async def one(prompt: str) -> int:
                r = await http.post(
                    "/completions",
                    json={"model": served["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0},
                )
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            await one("warm up")
            t0 = time.perf_counter()
            seq_tokens = 0
            for p in prompts:
                seq_tokens += await one(p)
            seq_s = time.perf_counter() - t0
            counts: list[int] = []

            async def counted(prompt: str) -> None:
                counts.append(await one(prompt))

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for p in prompts:
                    tg.start_soon(counted, p)
            par_s = time.perf_counter() - t0
    # leaving the Client closes the server's stdio: it stops its vLLM servers and exits
    return {
        "start_s": round(start_s, 1),
        "adapter_load_s": round(adapter_s, 2),
        "sequential_tokens_per_s": round(seq_tokens / seq_s, 1),
        "sequential_s": round(seq_s, 2),
        "concurrent_tokens_per_s": round(sum(counts) / par_s, 1),
        "concurrent_s": round(par_s, 2),
        "served_as": served["served_as"],
        "model": served["model"],
        "checks": {served["model"]: served.get("verification", {}), second["model"]: second.get("verification", {})},
    }
