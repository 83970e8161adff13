"""`llm-mcp demo`: build a tiny local model and drive the server through a real MCP client.

The server runs as a stdio subprocess (exactly as Claude Desktop would start it); every tool
call and a short view of its result is printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _show(name: str, args: dict[str, Any], result: Any, seconds: float) -> None:
    print(f"\n>>> {name}({json.dumps(args)})  [{seconds * 1000:.0f} ms]")
    if result.is_error:
        print(f"<<< ERROR: {result.content[0].text}")
        return
    text = result.content[0].text if result.content else ""
    lines = text.splitlines()
    print("<<< " + "\n    ".join(lines[:14]) + (f"\n    ... ({len(lines) - 14} more lines)" if len(lines) > 14 else ""))


async def run_demo(home: Path) -> None:
    from mcp import Client, StdioServerParameters

    from llm_mcp.tiny import make_tiny_model

    model_dir = home / "models" / "tiny-llama"
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        make_tiny_model(model_dir)
        print(f"built tiny model in {model_dir} ({time.perf_counter() - t0:.1f} s)")
    env = {**os.environ, "LLM_MCP_HOME": str(home)}
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp", "serve"], env=env)
    t0 = time.perf_counter()
    async with Client(params) as client:
        tools = await client.list_tools()
        print(f"connected over stdio in {(time.perf_counter() - t0) * 1000:.0f} ms; "
              f"tools: {', '.join(t.name for t in tools.tools)}")
        calls: list[tuple[str, dict[str, Any]]] = [
            ("list_models", {"method": "qlora", "fits": True}),
            ("list_models", {"model": "Qwen/Qwen3-8B", "gpu_memory_gb": 24}),
            ("list_models", {"model": "models/tiny-llama"}),
            ("list_models", {"model": "Qwen/Qwen3-7B"}),
        ]
        for name, args in calls:
            t1 = time.perf_counter()
            result = await client.call_tool(name, args)
            _show(name, args, result, time.perf_counter() - t1)
    print("\ndemo finished")


def main(argv: list[str] | None = None) -> int:
    import anyio

    home = Path(os.environ.get("LLM_MCP_HOME") or Path.cwd() / ".demo").resolve()
    home.mkdir(parents=True, exist_ok=True)
    anyio.run(run_demo, home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
