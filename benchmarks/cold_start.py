"""Cold start of `llm-mcp serve` (stdio): process spawn -> initialize -> first answered tools/list.

Run: .venv/bin/python benchmarks/cold_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import anyio
from mcp import Client, StdioServerParameters


async def once(home: str) -> float:
    env = {**os.environ, "LLM_MCP_HOME": home}
    t0 = time.perf_counter()
    async with Client(StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp"], env=env)) as client:
        await client.list_tools()
        elapsed = time.perf_counter() - t0
    return elapsed


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        times = [await once(home) for _ in range(runs)]
    print(f"cold start to first tools/list over stdio, {runs} runs: "
          f"median {statistics.median(times):.2f} s, min {min(times):.2f} s, max {max(times):.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    anyio.run(main, parser.parse_args().runs)
