"""A GRPO job's rollouts on disk: what each step sampled and scored, and the agent grader's hand-over.

    jobs/<id>/rollouts.jsonl         one line per completion: step, prompt, completion, scores, reward, advantage
    jobs/<id>/pending_rollouts.json  (agent grader) the step waiting for scores: its completions, at most
                                     MAX_PENDING
    jobs/<id>/rewards/<step>.json    the scores submit_rewards wrote for that step

The job writes the pending file and waits; submit_rewards checks the scores against it (same step, one
finite number per completion) and writes them whole (core.atomic), and the job goes on. Imports no torch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_mcp.core import atomic

ROLLOUTS_FILE = "rollouts.jsonl"
PENDING_FILE = "pending_rollouts.json"
MAX_PENDING = 32  # completions an agent grades per step
SHOWN_CHARS = 2000  # of a prompt or completion, in job_status
MAX_SCORE = 1e6


def append_rollouts(job_dir: Path, records: list[dict[str, Any]]) -> None:
    (job_dir / ROLLOUTS_FILE).touch()
    atomic.append(job_dir / ROLLOUTS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())


def recent_rollouts(job_dir: Path, n: int = 4, max_bytes: int = 256 * 1024) -> list[dict[str, Any]]:
    """The last `n` rollouts (prompt and completion cut to SHOWN_CHARS)."""
    try:
        with open(job_dir / ROLLOUTS_FILE, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - max_bytes))
            lines = fh.read().decode(errors="replace").splitlines()[1 if size > max_bytes else 0 :]
    except OSError:
        return []
    out = []
    for line in lines[-n:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        out.append({k: v[:SHOWN_CHARS] if isinstance(v, str) else v for k, v in record.items()})
    return out


def write_pending(job_dir: Path, step: int, items: list[dict[str, Any]], instructions: str | None, wait_s: float):
    """Show the agent the step's completions (items: prompt, completion, reference) and start waiting."""
    pending = {
        "step": step,
        "count": len(items),
        "instructions": instructions,
        "since": round(time.time(), 3),
        "wait_s": wait_s,
        "items": [
            {"index": i, **{k: v[:SHOWN_CHARS] if isinstance(v, str) else v for k, v in item.items()}}
            for i, item in enumerate(items)
        ],
    }
    atomic.replace(job_dir / PENDING_FILE, json.dumps(pending).encode())


def read_pending(job_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((job_dir / PENDING_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clear_pending(job_dir: Path) -> None:
    (job_dir / PENDING_FILE).unlink(missing_ok=True)


def scores_path(job_dir: Path, step: int) -> Path:
    return job_dir / "rewards" / f"{step}.json"


def scores_problem(pending: dict[str, Any] | None, step: int, scores: Any) -> str | None:
    """Why `scores` cannot be the rewards of `step` (None: they can)."""
    if pending is None:
        return "the job is not waiting for rewards (no pending rollouts); job_status shows when it is"
    if step != pending["step"]:
        return f"step={step}, but the job waits for step {pending['step']}; give step={pending['step']}"
    if not isinstance(scores, list) or len(scores) != pending["count"]:
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        return (
            f"scores has {got} entries, but step {step} has {pending['count']} completions: give one number each, "
            "in index order"
        )
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or abs(s) > MAX_SCORE:
            return f"scores[{i}]={s!r} is not a finite number within +-{MAX_SCORE:g}"
    return None


def waiting_for(job_dir: Path) -> dict[str, Any] | None:
    """The pending rollouts still without scores (None: the job waits for nothing, or its scores are in)."""
    pending = read_pending(job_dir)
    return pending if pending is not None and not scores_path(job_dir, pending["step"]).exists() else None


def submit(job_dir: Path, step: int, scores: list[float]) -> bool:
    """Store the agent's scores for `step` (checked against the pending rollouts). Returns False when that step's
    scores were already in (a repeated call: the first ones stand).

    Raises:
        ValueError: they do not fit the pending step.
    """
    if scores_path(job_dir, step).exists():
        return False
    why = scores_problem(read_pending(job_dir), step, scores)
    if why:
        raise ValueError(why)
    path = scores_path(job_dir, step)
    path.parent.mkdir(exist_ok=True)
    atomic.replace(path, json.dumps([float(s) for s in scores]).encode())
    return True


def read_scores(job_dir: Path, step: int) -> list[float] | None:
    try:
        data = json.loads(scores_path(job_dir, step).read_text())
    except (OSError, ValueError):
        return None
    return [float(s) for s in data] if isinstance(data, list) else None


def wait_scores(job_dir: Path, step: int, wait_s: float, stop: Callable[[], bool], poll_s: float = 0.2):
    """The scores for `step` once submitted; None when `wait_s` passed or `stop()` said so first."""
    deadline = time.monotonic() + wait_s
    while True:
        scores = read_scores(job_dir, step)
        if scores is not None:
            return scores
        if stop() or time.monotonic() > deadline:
            return None
        time.sleep(poll_s)
