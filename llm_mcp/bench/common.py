"""Shared pieces of the benchmarks: the model, mixed-length data, the server, running jobs, reports.

Benchmarks drive the server only as a client does: `python -m llm_mcp serve` in a subprocess over
stdio, MCP tool calls, and the files in the job directory whose path job_status returns. They
import nothing from the server's runtime (llm_mcp.server, tools, jobs, inference, http).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp import StdioServerParameters

WORDS = [
    "the",
    "cat",
    "sees",
    "a",
    "red",
    "ball",
    "and",
    "the",
    "robot",
    "builds",
    "a",
    "small",
    "house",
    "while",
    "my",
    "friend",
    "reads",
    "an",
    "old",
    "book",
    "near",
    "the",
    "long",
    "road",
    "under",
    "the",
    "blue",
    "sky",
    "where",
    "a",
    "green",
    "tree",
    "grows",
    "and",
    "the",
    "teacher",
    "writes",
    "what",
    "is",
    "seven",
    "plus",
    "three",
    "the",
    "answer",
    "is",
    "ten",
]

BENCH_MODEL = dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024, model_vocab_size=16384)
TINY_MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)


def build_model(home: Path, tiny: bool, name: str = "bench", dims: dict | None = None) -> Path:
    """A Llama built from a config (random init) in home/models/NAME, in a subprocess (keeps torch out).

    `dims`: make_tiny_model's keyword arguments (default: the tiny test model, or the 23M bench model)."""
    import subprocess
    import sys

    out = home / "models" / name
    if not (out / "config.json").exists():
        dims = dims if dims is not None else (TINY_MODEL if tiny else BENCH_MODEL)
        code = (
            "import sys, json; from llm_mcp.tiny import make_tiny_model; "
            "make_tiny_model(sys.argv[1], **json.loads(sys.argv[2]))"
        )
        subprocess.run([sys.executable, "-c", code, str(out), json.dumps(dims)], check=True, capture_output=True)
    return out


def mixed_length_data(path: Path, rows: int, min_tokens: int = 16, max_tokens: int = 512, seed: int = 0) -> Path:
    """prompt + completion rows whose lengths spread evenly over [min_tokens, max_tokens] (about a word a token)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        total = rng.randint(min_tokens, max_tokens)
        completion = max(4, int(total * rng.uniform(0.2, 0.6)))
        prompt = max(2, total - completion)
        lines.append(
            json.dumps(
                {
                    "prompt": " ".join(rng.choice(WORDS) for _ in range(prompt)),
                    "completion": " " + " ".join(rng.choice(WORDS) for _ in range(completion)),
                }
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def server_params(home: Path, sampler: str = "transformers") -> StdioServerParameters:
    """`python -m llm_mcp serve` over stdio on state dir `home`, as an MCP client configures it.

    LLM_MCP_* variables of the calling shell are left out (a set LLM_MCP_VLLM_URL, matrix or
    token would change what is measured); the state dir and sampler are given as flags.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MCP_")}
    return StdioServerParameters(
        command=sys.executable, env=env, args=["-m", "llm_mcp", "serve", "--home", str(home), "--sampler", sampler]
    )


async def call(client, tool: str, args: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """One tool call's structured result. RuntimeError with the tool's message when it fails; the SDK's
    timeout error when no answer comes within timeout_s."""
    result = await client.call_tool(tool, args, read_timeout_seconds=timeout_s)
    if result.is_error:
        raise RuntimeError(f"{tool}: {result.content[0].text}")
    return result.structured_content


async def run_job(client, args: dict[str, Any], tool: str = "start_finetune") -> dict[str, Any]:
    """Start a job through the MCP tools (start_finetune, or evaluate) and wait for it; returns its final
    job_status (job_id, job_dir, an evaluation's scores...)."""
    job_id = (await call(client, tool, args))["job_id"]
    while True:
        status = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 30})
        job = status.structured_content["job"]
        if job["state"] not in ("queued", "running"):
            if job["state"] != "succeeded":
                raise RuntimeError(status.content[0].text)
            return job


def wait_gone(home: Path, timeout: float = 30.0) -> None:
    """Wait until no process started for state dir `home` (trainers, vLLM servers) is left; warn otherwise.

    The server stops its vLLM servers when its stdio closes (and their watchers stop them if it is killed).
    """
    import psutil

    def left() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and str(home) in " ".join(p.info.get("cmdline") or []):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    deadline = time.monotonic() + timeout
    while (procs := left()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if procs:
        print(
            f"warning: {len(procs)} process(es) for {home} still running: {[p.pid for p in procs]}",
            file=sys.stderr,
            flush=True,
        )


def job_numbers(job_dir: Path | str) -> dict[str, Any]:
    """Tokens/s over the training loop, median step time, peak memory, final loss, trainable params.

    Read from metrics.jsonl in the job directory (job_status's job_dir).
    """
    from llm_mcp.core.jobdir import read_metrics

    metrics = read_metrics(Path(job_dir), max_bytes=1 << 30)
    steps = [m for m in metrics if "loss" in m and "step" in m]
    start = next(m for m in metrics if m.get("event") == "start")
    end = next((m for m in metrics if m.get("event") == "end"), {})
    loop_s = steps[-1]["time"] - (steps[0]["time"] - steps[0]["step_time_s"])
    tokens = sum(m["tokens"] for m in steps)
    return {
        "tokens": tokens,
        "train_s": round(loop_s, 3),
        "tokens_per_s": round(tokens / loop_s, 1),
        "step_s_median": round(statistics.median(m["step_time_s"] for m in steps), 4),
        "peak_memory_mb": end.get("peak_memory_mb"),
        "final_loss": steps[-1]["loss"],
        "trainable_params": start["trainable_params"],
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 4)


def write_report(
    out: Path,
    name: str,
    results: dict[str, Any],
    table: list[list[Any]],
    headers: list[str],
    chart: tuple[list[str], list[float], str] | None,
) -> None:
    """results.json, results.md (a table) and chart.png (bars) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = [f"# bench {name}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    (out / "results.md").write_text("\n".join(md) + "\n")
    if chart:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, values, ylabel = chart
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][: len(labels)])
        ax.set_ylabel(ylabel)
        ax.set_title(f"llm-mcp bench {name}", fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "chart.png")
        plt.close(fig)
    print("\n".join(md))
    print(f"\nwritten to {out}")


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def write_rows(path: Path, rows: list[dict]) -> None:
    """A JSONL dataset of `rows` at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def example_main(argv: list[str] | None, module: str, doc: str, run, table) -> int:
    """A worked example's command line: run it in a temporary state directory, print its table, and with --out
    write results.json there."""
    import anyio

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llm-mcp-example-") as tmp:
        results = anyio.run(run, Path(tmp) / "home")
    print(table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0
