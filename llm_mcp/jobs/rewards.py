"""job_status for GRPO jobs: the rewards of the last steps, a few recent rollouts, and what the agent must score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_mcp.core.rollouts import recent_rollouts, waiting_for

RECENT_STEPS = 10
SHOWN_ROLLOUTS = 4
REWARD_KEYS = (
    "reward",
    "reward_std",
    "zero_spread",
    "completion_length",
    "clip_fraction",
    "kl",
    "rollout_tokens_per_s",
)


def reward_summary(steps: list[dict[str, Any]]) -> dict[str, float] | None:
    """Means over the last RECENT_STEPS steps of the reward metrics (overall and reward/<grader>), with the first
    step's reward beside them; None for jobs without rewards."""
    rewarded = [m for m in steps if "reward" in m and "reward_accuracy" not in m]
    if not rewarded:
        return None
    recent = rewarded[-RECENT_STEPS:]
    keys = [k for k in recent[-1] if k in REWARD_KEYS or k.startswith("reward/")]
    out = {k: round(sum(m.get(k, 0.0) for m in recent) / len(recent), 4) for k in keys}
    out["first_reward"] = rewarded[0]["reward"]
    out["steps"] = len(recent)
    return out


def grpo_fields(job_dir: Path, steps: list[dict[str, Any]]) -> tuple[dict | None, list[dict], dict | None]:
    """(reward summary, the last few rollouts, the pending ones while the job waits or paused waiting for the agent)."""
    return reward_summary(steps), recent_rollouts(job_dir, SHOWN_ROLLOUTS), waiting_for(job_dir)


def reward_lines(rewards: dict[str, float] | None, pending: dict[str, Any] | None, job_id: str) -> list[str]:
    """What job_status's text says about rewards and the agent's pending rollouts."""
    lines = []
    if rewards:
        graders = ", ".join(
            f"{k.removeprefix('reward/')} {v:.3f}" for k, v in rewards.items() if k.startswith("reward/")
        )
        part = (
            f"GRPO reward {rewards['reward']:.3f} (first step {rewards['first_reward']:.3f}; last "
            f"{rewards['steps']:.0f} steps: {graders}), group std {rewards.get('reward_std', 0):.3f}, "
            f"no-spread groups {rewards.get('zero_spread', 0):.0%}, completion "
            f"{rewards.get('completion_length', 0):.1f} tokens, clipped {rewards.get('clip_fraction', 0):.1%}"
        )
        if "kl" in rewards:
            part += f", KL {rewards['kl']:.4f}"
        lines.append(part)
    if pending:
        lines.append(
            f"WAITING for your scores of step {pending['step']}: {pending['count']} completions (pending_rollouts; "
            f"instructions: {pending.get('instructions') or 'none'}). Call submit_rewards(job_id='{job_id}', "
            f"step={pending['step']}, scores=[{pending['count']} numbers in index order])."
        )
        for item in pending["items"][:8]:
            lines.append(f"  [{item['index']}] {item['completion'][:200]!r}")
        if pending["count"] > 8:
            lines.append(f"  ... {pending['count'] - 8} more in pending_rollouts")
    return lines
