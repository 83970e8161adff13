"""The SFT -> GRPO worked example and GRPO's rollout speed, through the MCP tools only (docs/guide.md numbers).

    python -m llm_mcp.bench.rewards [--out DIR]

On the tiny local model with a sharp head (llm_mcp.tiny.rewards): an SFT job teaches the answer's form (one
digit, any of 1-8), GRPO with a numeric grader teaches the digit the grader wants; evaluate scores base, SFT
and GRPO on held-out prompts about other things with the same grader. Then two GRPO workload shapes (4-token
completions x 8 generations, 32-token ones x 16) measure rollout tokens/s beside training tokens/s and the share
of each step spent sampling: generation is most of GRPO's time. Prints tables; writes results.json in --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mcp import Client

from llm_mcp.bench.common import TINY_MODEL, build_model, example_main, run_job, server_params, wait_gone, write_rows
from llm_mcp.core.jobdir import read_metrics
from llm_mcp.tiny import PREFERENCE_THINGS
from llm_mcp.tiny.rewards import reward_rows

GRADERS = [{"grader": "numeric"}]
SHAPES = {  # name -> GRPO arguments (on the plain tiny model, which rarely stops early)
    "4-token completions x 8 generations x 4 prompts": {"num_generations": 8, "max_new_tokens": 4, "batch_size": 4},
    "32-token completions x 16 generations x 2 prompts": {"num_generations": 16, "max_new_tokens": 32, "batch_size": 2},
}


async def _evaluate(client, targets: list[str]) -> list[dict]:
    args = {"targets": targets, "dataset": "data/held_out.jsonl", "graders": GRADERS, "max_tokens": 4}
    return (await run_job(client, {**args, "wait_seconds": 30}, tool="evaluate"))["evaluation"]["targets"]


def _speed(job_dir: str) -> dict:
    """Medians over the job's steps after the first: completion tokens sampled a second, the forward + backward's
    tokens (prompts and completions) a second, and the share of the step spent sampling."""
    steps = [m for m in read_metrics(Path(job_dir)) if "rollout_s" in m][1:]

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {
        "rollout_tokens_per_s": median([m["rollout_tokens_per_s"] for m in steps]),
        "train_tokens_per_s": median([m["tokens"] / max(m["step_time_s"] - m["rollout_s"], 1e-9) for m in steps]),
        "rollout_share": median([m["rollout_s"] / m["step_time_s"] for m in steps]),
        "step_s": median([m["step_time_s"] for m in steps]),
        "completion_length": median([m["completion_length"] for m in steps]),
    }


async def run(home: Path) -> dict:
    build_model(home, tiny=True, dims={**TINY_MODEL, "head_scale": 10})
    build_model(home, tiny=True, name="plain")  # a random head: near-uniform tokens, completions fill max_new_tokens
    train, held_out = reward_rows(PREFERENCE_THINGS[:8]), reward_rows(PREFERENCE_THINGS[8:])
    write_rows(home / "data" / "sft.jsonl", train["sft"])
    write_rows(home / "data" / "prompts.jsonl", train["prompts"])
    write_rows(home / "data" / "held_out.jsonl", held_out["prompts"])
    fast = dict(model="models/bench", method="lora", lora_dropout=0.0, max_seq_len=64, checkpoint_every=0)
    t0 = time.time()
    async with Client(server_params(home)) as client:
        sft = await run_job(client, {**fast, "dataset": "data/sft.jsonl", "max_steps": 60, "learning_rate": 3e-3})
        grpo_args = {
            **fast,
            "objective": "grpo",
            "init_from": sft["job_id"],
            "dataset": "data/prompts.jsonl",
            "max_new_tokens": 4,
            "batch_size": 4,
        }
        grpo = await run_job(client, {**grpo_args, "graders": GRADERS, "max_steps": 30, "learning_rate": 2e-3})
        scores = await _evaluate(client, ["base", sft["job_id"], grpo["job_id"]])
        speed = {}
        for name, shape in SHAPES.items():
            args = {
                **grpo_args,
                "model": "models/plain",
                "graders": GRADERS,
                "max_steps": 8,
                "max_seq_len": 96,
                **shape,
            }
            job = await run_job(client, {k: v for k, v in args.items() if k != "init_from"})
            speed[name] = _speed(job["job_dir"])
    wait_gone(home)
    return {
        "sft_job": sft["job_id"],
        "grpo_job": grpo["job_id"],
        "held_out": scores,
        "grpo_rewards": grpo["rewards"],
        "speed": speed,
        "wall_s": round(time.time() - t0, 1),
    }


def table(results: dict) -> str:
    names = {"base": "base", results["sft_job"]: "SFT adapter", results["grpo_job"]: "GRPO adapter (from SFT)"}
    lines = ["| target | held-out reward (numeric) |", "|---|---|"]
    lines += [f"| {names[t['target']]} | {t['reward']:.3f} |" for t in results["held_out"]]
    r = results["grpo_rewards"]
    lines.append(
        f"\nGRPO job: reward {r['first_reward']:.3f} at step 1 -> {r['reward']:.3f} (last {r['steps']:.0f} steps); "
        f"{results['wall_s']:.0f} s in all\n"
    )
    lines += [
        "| GRPO shape | rollout tokens/s | training tokens/s | training / rollout | step s | share sampling |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in results["speed"].items():
        lines.append(
            f"| {name} | {s['rollout_tokens_per_s']:,.0f} | "
            f"{s['train_tokens_per_s']:,.0f} | {s['train_tokens_per_s'] / s['rollout_tokens_per_s']:.1f}x | "
            f"{s['step_s']:.3f} | {s['rollout_share']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return example_main(argv, "llm_mcp.bench.rewards", __doc__, run, table)


if __name__ == "__main__":
    sys.exit(main())
