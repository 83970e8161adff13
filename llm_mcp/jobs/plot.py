"""Charts as PNG bytes: a job's loss curve, an evaluation's scores (matplotlib, Agg; imported only when asked for)."""

from __future__ import annotations

import io
from typing import Any


def loss_curve_png(metrics: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [m for m in metrics if "reward" in m and "step" in m and "reward_accuracy" not in m]
    if rewards:
        return _reward_curve(plt, rewards, title)
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    return _png(plt, fig)


def _reward_curve(plt, steps: list[dict[str, Any]], title: str) -> bytes:
    """GRPO: the mean reward per step (and each grader's), with the within-group spread shaded."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    x = [m["step"] for m in steps]
    mean = [m["reward"] for m in steps]
    std = [m.get("reward_std", 0.0) for m in steps]
    ax.plot(x, mean, label="reward", linewidth=1.4)
    ax.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.15)
    graders = [k for k in steps[-1] if k.startswith("reward/")]
    if len(graders) > 1:
        for key in graders:
            ax.plot(x, [m.get(key, 0.0) for m in steps], label=key.removeprefix("reward/"), linewidth=0.9, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (shaded: group std)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(plt, fig)


def evaluation_png(summary: dict[str, Any], title: str) -> bytes:
    """Grouped bars: each score (accuracy-like, 0-1) per target, and the loss per target beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = summary["targets"]
    scores = [k for k in ("exact_match", "contains", "regex", "preference_accuracy") if any(k in t for t in targets)]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=100, gridspec_kw={"width_ratios": [max(1, len(scores)), 1]})
    width = 0.8 / max(1, len(targets))
    for j, t in enumerate(targets):
        axes[0].bar(
            [i + j * width for i in range(len(scores))], [t.get(k, 0) for k in scores], width, label=t["target"]
        )
        axes[1].bar([j], [t.get("loss", 0)], 0.6, label=t["target"])
    axes[0].set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(scores))], scores, fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(range(len(targets)), [t["target"] for t in targets], fontsize=7, rotation=20)
    axes[1].set_ylabel("loss (nats / token)")
    fig.suptitle(title, fontsize=9)
    return _png(plt, fig)


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
