"""`llm-mcp demo`: build a tiny local model and drive the server through a real MCP client.

The server runs as a stdio subprocess (exactly as Claude Desktop would start it); every tool
call and a short view of its result is printed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _show(name: str, args: dict[str, Any], result: Any, seconds: float, expect_error: bool = False) -> None:
    shown = {k: (f"[{len(v)} rows]" if k == "rows" else v) for k, v in args.items()}
    print(f"\n>>> {name}({json.dumps(shown)})  [{seconds * 1000:.0f} ms]")
    if result.is_error:
        label = "refused, as this call meant to show" if expect_error else "ERROR"
        print(f"<<< {label}: " + "\n    ".join(result.content[0].text.splitlines()))
        return
    text = result.content[0].text if result.content else ""
    lines = text.splitlines()
    print("<<< " + "\n    ".join(lines[:14]) + (f"\n    ... ({len(lines) - 14} more lines)" if len(lines) > 14 else ""))


def demo_rows() -> list[dict[str, Any]]:
    """A small chat + prompt/completion dataset the tiny model can visibly learn."""
    rows: list[dict[str, Any]] = []
    for i in range(96):
        a, b = i % 7, (i * 3) % 5
        if i % 2:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"The answer is {a + b}."},
                    ]
                }
            )
        else:
            rows.append({"prompt": f"Q: {a} plus {b}? A:", "completion": f" {a + b}"})
    return rows


def _pending(name: str, result: Any) -> bool:
    """vLLM still starting, or a merge still running: the result says so in `state`; call again."""
    state = (result.structured_content or {}).get("state")
    return (
        not result.is_error
        and name in ("sample", "serve_adapter", "export_adapter")
        and state in ("starting", "merging", "running")
    )


async def _until_done(client, job_id: str) -> Any:
    while True:
        t1 = time.perf_counter()
        result = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 30})
        _show("job_status", {"job_id": job_id, "wait_seconds": 30}, result, time.perf_counter() - t1)
        if result.structured_content["job"]["state"] in ("succeeded", "failed", "cancelled"):
            return result


async def run_demo(home: Path) -> None:
    import anyio
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
        print(
            f"connected over stdio in {(time.perf_counter() - t0) * 1000:.0f} ms; "
            f"tools: {', '.join(t.name for t in tools.tools)}"
        )

        async def call(name: str, args: dict[str, Any], expect_error: bool = False) -> Any:
            while True:
                t1 = time.perf_counter()
                result = await client.call_tool(name, args)
                _show(name, args, result, time.perf_counter() - t1, expect_error)
                if not _pending(name, result):
                    return result
                await anyio.sleep(2)  # vLLM is starting / a merge is running: call again, as an agent would

        await call("list_models", {"method": "qlora", "fits": True})
        await call("list_models", {"model": "Qwen/Qwen3-8B", "gpu_memory_gb": 24})
        await call("list_models", {"model": "models/tiny-llama"})
        await call("list_models", {"model": "Qwen/Qwen3-7B"}, expect_error=True)
        await call("save_dataset", {"name": "demo", "rows": demo_rows(), "mode": "overwrite"})
        await call("datasets", {"path": "data/demo.jsonl", "model": "models/tiny-llama", "max_seq_len": 64})
        job = {
            "model": "models/tiny-llama",
            "method": "lora",
            "dataset": "data/demo.jsonl",
            "max_steps": 60,
            "learning_rate": 5e-3,
            "max_seq_len": 64,
            "eval_fraction": 0.1,
            "eval_every": 20,
            "checkpoint_every": 20,
        }
        await call(
            "start_finetune",
            {**job, "method": "lora", "learning_rate": 50.0, "dataset": "data/missing.jsonl"},
            expect_error=True,
        )
        await call("start_finetune", {**job, "dry_run": True})
        started = await call("start_finetune", job)
        job_id = started.structured_content["job_id"]
        await _until_done(client, job_id)
        await call("sample", {"job_id": job_id, "prompt": "Q: 2 plus 3? A:", "max_tokens": 8, "compare_base": True})
        await call(
            "sample",
            {"job_id": job_id, "messages": [{"role": "user", "content": "What is 4 plus 1?"}], "max_tokens": 12},
        )
        await call("export_adapter", {"job_id": job_id, "format": "peft"})
        await call("export_adapter", {"job_id": job_id, "format": "merged"})
        if importlib.util.find_spec("vllm"):
            await call("serve_adapter", {"job_id": job_id})
        qlora = await call("start_finetune", {**job, "method": "qlora", "max_steps": 400})
        q_id = qlora.structured_content["job_id"]
        await anyio.sleep(12)
        await call("cancel_job", {"job_id": q_id})
        await _until_done(client, q_id)
        resume = {**job, "method": "qlora", "resume_from": q_id}
        await call("start_finetune", {**resume, "max_steps": 10}, expect_error=True)  # not past the checkpoint
        resumed = await call("start_finetune", {**resume, "max_steps": 400})
        await _until_done(client, resumed.structured_content["job_id"])
        await call("job_status", {})
    print("\ndemo finished: adapters are under", home / "jobs")


def main(argv: list[str] | None = None) -> int:
    import anyio

    home = Path(os.environ.get("LLM_MCP_HOME") or Path.cwd() / ".demo").resolve()
    home.mkdir(parents=True, exist_ok=True)
    anyio.run(run_demo, home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
