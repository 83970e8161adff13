"""The SFT -> evaluate -> DPO -> evaluate worked example, through the MCP tools only (README numbers).

    python -m llm_mcp.bench.preference [--out DIR]

On the tiny local model: an SFT job on conversations about 8 things, evaluate base vs SFT on
held-out conversations about 4 other things, a DPO job from the SFT adapter on preference pairs
('Yes, X is Y.' over 'No, X is not Y.') about the 8 things, then evaluate base vs SFT vs DPO on
held-out pairs about the other 4. Prints the calls and a table; writes results.json in --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mcp import Client

from llm_mcp.bench.common import build_model, example_main, run_job, server_params, wait_gone, write_rows
from llm_mcp.tiny import PREFERENCE_THINGS, preference_rows


async def _evaluate(client, targets: list[str], dataset: str) -> list[dict]:
    args = {"targets": targets, "dataset": dataset, "max_tokens": 12, "wait_seconds": 30}
    return (await run_job(client, args, tool="evaluate"))["evaluation"]["targets"]


async def run(home: Path) -> dict:
    build_model(home, tiny=True)
    fast = dict(model="models/bench", method="lora", lora_dropout=0.0, batch_size=4, max_seq_len=64)
    write_rows(home / "data" / "sft.jsonl", preference_rows(PREFERENCE_THINGS[:8])["sft"])
    write_rows(home / "data" / "sft_eval.jsonl", preference_rows(PREFERENCE_THINGS[8:])["sft"])
    write_rows(home / "data" / "pref.jsonl", preference_rows(PREFERENCE_THINGS[:8])["pairs"])
    write_rows(home / "data" / "pref_eval.jsonl", preference_rows(PREFERENCE_THINGS[8:], chat_every=1)["pairs"])
    t0 = time.time()
    async with Client(server_params(home)) as client:
        sft = await run_job(client, {**fast, "dataset": "data/sft.jsonl", "max_steps": 12, "learning_rate": 3e-3})
        after_sft = await _evaluate(client, ["base", sft["job_id"]], "data/sft_eval.jsonl")
        dpo = await run_job(
            client,
            {
                **fast,
                "objective": "dpo",
                "init_from": sft["job_id"],
                "dataset": "data/pref.jsonl",
                "eval_dataset": "data/pref_eval.jsonl",
                "max_steps": 60,
                "learning_rate": 2e-3,
            },
        )
        after_dpo = await _evaluate(client, ["base", sft["job_id"], dpo["job_id"]], "data/pref_eval.jsonl")
    wait_gone(home)
    return {
        "sft_job": sft["job_id"],
        "dpo_job": dpo["job_id"],
        "after_sft": after_sft,
        "after_dpo": after_dpo,
        "dpo_status": {
            k: dpo[k]
            for k in (
                "first_loss",
                "loss",
                "reward_accuracy",
                "reward_margin",
                "eval_reward_accuracy",
                "eval_reward_margin",
            )
        },
        "wall_s": round(time.time() - t0, 1),
    }


def table(results: dict) -> str:
    names = {"base": "base", results["sft_job"]: "SFT adapter", results["dpo_job"]: "DPO adapter (from SFT)"}
    lines = [
        "| target | held-out SFT loss | perplexity | held-out preference accuracy | mean log-prob margin |",
        "|---|---|---|---|---|",
    ]
    sft_scores = {t["target"]: t for t in results["after_sft"]}
    for t in results["after_dpo"]:
        s = sft_scores.get(t["target"], {})
        loss = f"{s['loss']:.3f}" if s else "-"
        ppl = f"{s['perplexity']:.1f}" if s else "-"
        lines.append(
            f"| {names[t['target']]} | {loss} | {ppl} | {t['preference_accuracy']:.2f} | "
            f"{t['preference_margin']:+.2f} |"
        )
    d = results["dpo_status"]
    lines.append(
        f"\nDPO job: loss {d['first_loss']:.3f} -> {d['loss']:.3f}; reward accuracy {d['reward_accuracy']:.2f} "
        f"(train, last 10 steps), {d['eval_reward_accuracy']:.2f} on held-out pairs "
        f"(margin {d['eval_reward_margin']:+.3f}); {results['wall_s']:.0f} s in all"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return example_main(argv, "llm_mcp.bench.preference", __doc__, run, table)


if __name__ == "__main__":
    sys.exit(main())
