"""bench server: cold start, tool latency over stdio and streamable HTTP with a job running, and
50 concurrent HTTP clients.

The concurrent phase uses a lean protocol client (httpx: initialize, then tools/call in the
session) rather than the SDK's `Client`, which validates every result against the tool's JSON
schema: 50 of those in one process on 2 cores measure the load generator, not the server.

The load phase alone, against a server somebody else started, prints its result as one JSON line:

    python -m llm_mcp.bench.server load URL JOB_ID [--clients 50] [--calls 10] [--think-s 1.0] [--token T]
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from llm_mcp.bench.common import build_model, mixed_length_data, write_report
from llm_mcp.core.procs import free_port


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2)


async def _latencies(client, job_id: str, calls: int) -> dict[str, dict[str, float]]:
    out = {}
    for tool, args in (("list_models", {}), ("job_status", {"job_id": job_id})):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            result = await client.call_tool(tool, args)
            times.append(time.perf_counter() - t0)
            assert not result.is_error, result.content[0].text
        out[tool] = {"p50_ms": _pct(times, 0.5), "p95_ms": _pct(times, 0.95)}
    return out


async def lean_session(url: str, token: str | None = None):
    """An MCP session over streamable HTTP; returns (httpx client, rpc(method, params) -> result)."""
    import json

    import httpx
    from mcp_types import LATEST_PROTOCOL_VERSION

    http = httpx.AsyncClient(timeout=60)
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ids = iter(range(1, 1 << 30))

    async def rpc(method: str, params: dict, notify: bool = False) -> dict:
        body = {"jsonrpc": "2.0", "method": method, "params": params} | ({} if notify else {"id": next(ids)})
        r = await http.post(url, json=body, headers=headers)
        r.raise_for_status()
        headers.setdefault("mcp-session-id", r.headers.get("mcp-session-id", ""))
        if notify:
            return {}
        text = r.text
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            text = [ln[5:] for ln in text.splitlines() if ln.startswith("data:")][-1]
        answer = json.loads(text)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["result"]

    init = await rpc(
        "initialize",
        {
            "protocolVersion": LATEST_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "llm-mcp-bench", "version": "0"},
        },
    )
    assert init["serverInfo"]["name"] == "llm-mcp"
    await rpc("notifications/initialized", {}, notify=True)
    return http, rpc


async def concurrent_clients(
    url: str, job_id: str, clients: int, calls: int, think_s: float, token: str | None = None
) -> dict[str, Any]:
    """`clients` sessions, each alternating list_models / job_status `calls` times with think time between."""
    import random

    import anyio

    lat: dict[str, list[float]] = {"list_models": [], "job_status": []}
    errors: list[str] = []

    async def user(n: int) -> None:
        rnd = random.Random(n)
        http, rpc = await lean_session(url, token)
        try:
            await anyio.sleep(rnd.uniform(0, think_s))
            for i in range(calls):
                tool, args = ("list_models", {}) if (n + i) % 2 else ("job_status", {"job_id": job_id})
                t0 = time.perf_counter()
                result = await rpc("tools/call", {"name": tool, "arguments": args})
                lat[tool].append(time.perf_counter() - t0)
                if result.get("isError"):
                    errors.append(result["content"][0]["text"])
                await anyio.sleep(rnd.uniform(0.5 * think_s, 1.5 * think_s))
        finally:
            await http.aclose()

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(clients):
            tg.start_soon(user, n)
    every = lat["list_models"] + lat["job_status"]
    return {
        "clients": clients,
        "calls_each": calls,
        "think_s": think_s,
        "errors": len(errors),
        "wall_s": round(time.perf_counter() - t0, 2),
        **{f"{k}_p95_ms": _pct(v, 0.95) for k, v in lat.items()},
        "all_p50_ms": _pct(every, 0.5),
        "all_p95_ms": _pct(every, 0.95),
    }


async def bench_server(out: Path, reps: int, calls: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="llm-mcp-bench-"))
    env = {**os.environ, "LLM_MCP_HOME": str(home)}
    stdio = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp"], env=env)
    http = None
    try:
        cold = []
        for _ in range(reps):
            t0 = time.perf_counter()
            async with Client(stdio) as client:
                await client.list_tools()
                cold.append(time.perf_counter() - t0)
        build_model(home, tiny=True)
        mixed_length_data(home / "data" / "mixed.jsonl", 256, max_tokens=64)
        job = {
            "model": "models/bench",
            "method": "lora",
            "dataset": "data/mixed.jsonl",
            "max_steps": 100_000,
            "max_seq_len": 64,
            "checkpoint_every": 0,
        }
        async with Client(stdio) as client:
            starts = []
            running = await client.call_tool("start_finetune", job)
            job_id = running.structured_content["job_id"]
            for _ in range(reps * 3):  # queued behind the running job: validation + insert
                t0 = time.perf_counter()
                queued = await client.call_tool("start_finetune", {**job, "max_steps": 10})
                starts.append(time.perf_counter() - t0)
                await client.call_tool("cancel_job", {"job_id": queued.structured_content["job_id"]})
            while (await client.call_tool("job_status", {"job_id": job_id})).structured_content["job"]["step"] < 1:
                time.sleep(0.2)
            over_stdio = await _latencies(client, job_id, calls)
        port = free_port()
        http = subprocess.Popen(
            [sys.executable, "-m", "llm_mcp", "serve", "--transport", "streamable-http", "--port", str(port)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            over_http = await _latencies(client, job_id, calls)
            load = {
                f"think_{t:g}s": await concurrent_clients(f"http://127.0.0.1:{port}/mcp", job_id, 50, 10, t)
                for t in (1.0, 0.0)
            }
            await client.call_tool("cancel_job", {"job_id": job_id})
    finally:
        if http:
            http.terminate()
            http.wait(10)
        shutil.rmtree(home, ignore_errors=True)
    return _report(out, cold, starts, over_stdio, over_http, load, calls, reps)


def _report(out: Path, cold, starts, over_stdio, over_http, load, calls: int, reps: int) -> dict[str, Any]:
    """The server benchmark's results, written as JSON, a table and a chart."""
    results = {
        "benchmark": "server",
        "cold_start_s": {
            "median": round(statistics.median(cold), 3),
            "min": round(min(cold), 3),
            "max": round(max(cold), 3),
        },
        "start_finetune_ms": {"p50": _pct(starts, 0.5), "max": round(max(starts) * 1000, 2)},
        "stdio": over_stdio,
        "streamable_http": over_http,
        "calls": calls,
        "reps": reps,
        "concurrent_http_clients": load,
    }
    table = [
        ["cold start to first tools/list (stdio)", f"{results['cold_start_s']['median']} s (median)", ""],
        ["start_finetune return (queued job)", f"{results['start_finetune_ms']['p50']} ms", ""],
    ]
    for transport, lat in (("stdio", over_stdio), ("streamable HTTP", over_http)):
        for tool, v in lat.items():
            table.append([f"{tool} over {transport}, a job training", f"{v['p50_ms']} ms", f"{v['p95_ms']} ms"])
    for name, v in load.items():
        table.append(
            [
                f"50 HTTP clients x 10 calls, {name.replace('_', ' ')} between calls, a job training "
                f"({v['errors']} errors)",
                f"{v['all_p50_ms']} ms",
                f"{v['all_p95_ms']} ms",
            ]
        )
    write_report(
        out,
        "server",
        results,
        table,
        ["what", "p50 / median", "p95"],
        (
            [f"{t}\n{tr}" for tr, lat in (("stdio", over_stdio), ("http", over_http)) for t in lat],
            [v["p95_ms"] for lat in (over_stdio, over_http) for v in lat.values()],
            "p95 ms",
        ),
    )
    return results


def main(argv: list[str] | None = None) -> int:
    """`load URL JOB_ID ...`: the concurrent-clients phase against a running streamable-HTTP server."""
    import argparse
    import json

    import anyio

    parser = argparse.ArgumentParser(
        prog="python -m llm_mcp.bench.server", description="MCP load generator: concurrent streamable-HTTP sessions"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="sessions alternating list_models / job_status JOB_ID; prints one JSON line")
    load.add_argument("url", help="the server's MCP endpoint, e.g. http://127.0.0.1:8765/mcp")
    load.add_argument("job_id", help="the job job_status asks about")
    load.add_argument("--clients", type=int, default=50)
    load.add_argument("--calls", type=int, default=10, help="tool calls per client")
    load.add_argument("--think-s", type=float, default=1.0, help="mean pause between a client's calls")
    load.add_argument("--token", help="bearer token (default LLM_MCP_AUTH_TOKEN, if set)")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("LLM_MCP_AUTH_TOKEN") or None
    result = anyio.run(concurrent_clients, args.url, args.job_id, args.clients, args.calls, args.think_s, token)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
