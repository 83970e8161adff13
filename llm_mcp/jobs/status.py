"""job_status: one job's progress from its record, metrics.jsonl, checkpoints and log."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from llm_mcp.core.jobdir import (
    checkpoints,
    log_tail,
    public_log,
    read_metrics,
    read_ranks,
    read_result,
    redact_paths,
    worst_rows,
)
from llm_mcp.core.objectives import OBJECTIVES
from llm_mcp.core.store import FINAL_STATES, Job, JobStore
from llm_mcp.jobs.rewards import grpo_fields, reward_lines


class CheckpointInfo(BaseModel):
    step: int
    path: str


class JobStatus(BaseModel):
    job_id: str
    name: str
    state: str = Field(description="queued | running | succeeded | failed | cancelled")
    model: str
    method: str
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = Field(None, description="Train loss at the latest step (mean over trainable tokens).")
    smoothed_loss: float | None = Field(None, description="Exponential moving average of the train loss (0.9).")
    first_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = Field(None, description="Real (non-padding) tokens per second, last 10 steps.")
    elapsed_s: float | None = None
    eta_s: float | None = None
    objective: str = Field(
        "causal_lm", description="causal_lm (supervised) | dpo (preference pairs) | grpo (rewards) | evaluate."
    )
    evaluation: dict | None = Field(None, description="evaluate jobs: per-target scores and the per-row file.")
    worst_rows: list[dict] = Field(
        default_factory=list,
        description="evaluate jobs: the rows scored worst (input, reference, generated, scores), one page of them.",
    )
    worst_rows_total: int | None = Field(None, description="evaluate jobs: per-row results in all (page through).")
    reward_accuracy: float | None = Field(
        None, description="dpo: fraction of pairs whose implicit reward ranks chosen above rejected (last 10 steps)."
    )
    reward_margin: float | None = Field(None, description="dpo: mean chosen minus rejected reward (last 10 steps).")
    eval_reward_accuracy: float | None = Field(None, description="dpo: reward accuracy on the eval pairs.")
    eval_reward_margin: float | None = None
    rewards: dict | None = Field(
        None,
        description="grpo: means over the last 10 steps of reward (and reward/<grader>), reward_std (within groups), "
        "zero_spread (share of groups whose completions all scored alike: nothing to learn), completion_length, "
        "clip_fraction, kl, rollout_tokens_per_s; first_reward is step 1's.",
    )
    rollouts: list[dict] = Field(default_factory=list, description="grpo: the last few completions with their scores.")
    pending_rollouts: dict | None = Field(
        None,
        description="grpo with the agent grader: the step waiting for scores, its completions (items, by index) and "
        "the grader's instructions; answer with submit_rewards.",
    )
    density: float | None = Field(None, description="sparse: fraction of target-matrix entries trained.")
    mask_update: dict[str, int] | None = Field(None, description="sparse: {step, changed} of the last RigL update.")
    checkpoints: list[CheckpointInfo] = []
    adapter_path: str | None = None
    log_tail: list[str] = []
    warnings: list[str] = []
    error: str | None = Field(None, description="On failure: the cause in one sentence.")
    next_step: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    resumed_from: str | None = None
    job_dir: str
    engine: str = Field("local", description="Where it runs: local | slurm | ray.")
    engine_job_id: str | None = Field(None, description="The Slurm job id or Ray submission id.")
    queue_state: str | None = Field(
        None,
        description="The engine's own state, e.g. 'PENDING (Resources)': a job "
        "pending in the cluster's queue is 'queued' here, not running.",
    )
    nodes: str | None = Field(None, description="The hosts the job runs on, as the engine names them.")
    ranks: list[dict] = Field(
        default_factory=list,
        description="A job of several processes: each rank's node, node rank and state (running, ok, failed, "
        "or lost: it ended without a word).",
    )
    download: dict | None = Field(
        None, description="While the hub model downloads (before step 0): downloaded_bytes, total_bytes, rate, ETA."
    )


def build_status(store: JobStore, job: Job, log_lines: int = 12, page: int = 1) -> JobStatus:
    job_dir = store.job_dir(job.id)
    metrics = read_metrics(job_dir)
    start = next((m for m in reversed(metrics) if m.get("event") == "start"), None)
    steps = [m for m in metrics if "loss" in m and "step" in m]
    evals = [m for m in metrics if "eval_loss" in m and m["eval_loss"] is not None]
    status = JobStatus(
        job_id=job.id,
        name=job.name,
        state=job.state,
        model=job.model,
        method=job.method,
        warnings=job.warnings,
        error=redact_paths(job.error, store.home) if job.error else None,
        next_step=job.next_step,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        resumed_from=job.resumed_from,
        job_dir=str(job_dir),
        engine=job.engine,
        engine_job_id=job.engine_id,
        queue_state=job.engine_state,
        nodes=job.nodes,
        log_tail=public_log(log_tail(job_dir, log_lines * 4), store.home)[-log_lines:]
        if job.state != "queued" and log_lines
        else [],
    )
    status.ranks = [
        {
            "rank": r["rank"],
            "node": r.get("node"),
            "node_rank": r.get("node_rank"),
            "state": r.get("ended") or ("lost" if job.state in FINAL_STATES else "running"),
        }
        for r in read_ranks(job_dir)
    ]
    hosts = list(dict.fromkeys(str(r["node"]) for r in status.ranks))
    if len(hosts) > 1:  # the ranks know every node; an engine may name only where the job's driver runs (Ray)
        status.nodes = ", ".join(hosts)
    fetched = [m for m in metrics if m.get("event") == "download"]
    if fetched and fetched[-1].get("state") == "downloading" and job.state == "running" and not start:
        status.download = {
            k: fetched[-1].get(k) for k in ("model", "downloaded_bytes", "total_bytes", "rate_bps", "eta_s")
        }
    if start:
        status.total_steps = start["total_steps"]
        seen = start.get("examples", 0) + start.get("dropped", 0)
        if start.get("truncated") or start.get("dropped"):
            status.warnings = [
                *status.warnings,
                f"the trainer truncated {start.get('truncated', 0)} of {seen} "
                f"training sequences to max_seq_len and dropped {start.get('dropped', 0)} left with "
                "no trained token",
            ]
    if steps:
        last = steps[-1]
        status.step, status.epoch, status.loss = last["step"], last.get("epoch"), last["loss"]
        status.learning_rate = last.get("lr")
        status.first_loss = steps[0]["loss"]
        ema = steps[0]["loss"]
        for m in steps[1:]:
            ema = 0.9 * ema + 0.1 * m["loss"]
        status.smoothed_loss = round(ema, 6)
        recent = steps[-10:]
        tokens, seconds = sum(m.get("tokens", 0) for m in recent), sum(m.get("step_time_s", 0) for m in recent)
        status.tokens_per_s = round(tokens / seconds, 1) if seconds else None
        if job.state == "running" and status.total_steps and seconds:
            status.eta_s = round((status.total_steps - status.step) * seconds / len(recent), 1)
    if evals:
        status.eval_loss = evals[-1]["eval_loss"]
        status.eval_reward_accuracy = evals[-1].get("eval_reward_accuracy")
        status.eval_reward_margin = evals[-1].get("eval_reward_margin")
    status.objective = job.config.objective if job.config.task == "train" else "evaluate"
    progress = [m for m in metrics if "rows_done" in m]
    if progress:
        status.step = progress[-1]["rows_done"]
    if job.config.task == "evaluate" and job.state in ("succeeded", "cancelled"):
        status.evaluation = (read_result(job_dir) or {}).get("evaluation")
        status.worst_rows, status.worst_rows_total = worst_rows(job_dir, page)
    rewarded = [m for m in steps[-10:] if "reward_accuracy" in m]
    if rewarded:
        status.reward_accuracy = round(sum(m["reward_accuracy"] for m in rewarded) / len(rewarded), 4)
        status.reward_margin = round(sum(m["reward_margin"] for m in rewarded) / len(rewarded), 4)
    if status.objective in OBJECTIVES and OBJECTIVES[status.objective].samples:
        status.rewards, status.rollouts, status.pending_rollouts = grpo_fields(job_dir, steps)
    if steps and "density" in steps[-1]:
        status.density = steps[-1]["density"]
        updates = [m for m in steps if m.get("mask_changed")]
        if updates:
            status.mask_update = {"step": updates[-1]["step"], "changed": updates[-1]["mask_changed"]}
    if job.started_at:
        status.elapsed_s = round((job.finished_at or time.time()) - job.started_at, 1)
    status.checkpoints = [CheckpointInfo(step=step, path=str(p)) for step, p in checkpoints(job_dir)]
    if job.state == "succeeded" and (job_dir / "adapter").is_dir():
        status.adapter_path = str(job_dir / "adapter")
    if job.state == "failed" and not status.error:
        result = read_result(job_dir)
        status.error = (result or {}).get("error")
    return status


def _row(r: dict) -> str:
    scores = ", ".join(f"{k} {'yes' if r[k] else 'no'}" for k in ("exact_match", "contains", "regex") if k in r)
    loss = f"loss {r['loss']:.3f}" if "loss" in r else ""
    head = f"- [{r['target']}] row {r['row']}: " + "; ".join(x for x in (scores, loss) if x)
    if "got" not in r:
        return head
    shown = {"input": r.get("input", ""), "expected": r.get("expected", ""), "got": r["got"]}
    return head + "".join(f"\n    {k}: {v[:160]!r}" for k, v in shown.items())


def summarize_status(s: JobStatus) -> str:
    """A few lines an LLM reads at a glance."""
    about = OBJECTIVES[s.objective].short if s.objective in OBJECTIVES else ""
    head = f"Job {s.job_id} ({s.method}{' ' + about if about else ''} on {s.model}): {s.state.upper()}"
    if s.total_steps:
        head += f", step {s.step}/{s.total_steps}"
    lines = [head]
    if s.engine != "local":
        lines.append(
            f"{s.engine} job {s.engine_job_id or '(not submitted)'}: {s.queue_state or 'unknown'}"
            + (f" on {s.nodes}" if s.nodes else "")
        )
    if s.ranks:
        lines.append("ranks: " + ", ".join(f"{r['rank']} on {r['node']} ({r['state']})" for r in s.ranks))
    if s.download:
        d, gb = s.download, 2**30
        got, total = (d["downloaded_bytes"] or 0) / gb, (d["total_bytes"] or 0) / gb
        lines.append(
            f"downloading {d['model']}: {got:.1f} of {total:.1f} GB"
            + (
                f" at {d['rate_bps'] / 2**20:.0f} MB/s, ETA {d['eta_s']:.0f} s"
                if d.get("rate_bps") and d.get("eta_s")
                else ""
            )
        )
    if s.loss is not None:
        part = f"loss {s.loss:.4f} (smoothed {s.smoothed_loss:.4f}, first {s.first_loss:.4f})"
        if s.eval_loss is not None:
            part += f", eval loss {s.eval_loss:.4f}"
        if s.tokens_per_s:
            part += f", {s.tokens_per_s:,.0f} tokens/s"
        lines.append(part)
    if s.reward_accuracy is not None:
        part = f"DPO reward accuracy {s.reward_accuracy:.2f}, margin {s.reward_margin:.3f} (last 10 steps)"
        if s.eval_reward_accuracy is not None:
            part += f"; eval reward accuracy {s.eval_reward_accuracy:.2f}, margin {s.eval_reward_margin:.3f}"
        lines.append(part)
    lines += reward_lines(s.rewards, s.pending_rollouts, s.job_id)
    if s.evaluation:
        lines += [_scores(t) for t in s.evaluation["targets"]]
        lines.append(f"per-row results: {s.evaluation['rows_file']}")
    if s.worst_rows:
        lines.append(f"worst rows ({len(s.worst_rows)} of {s.worst_rows_total}; page=N for more):")
        lines += [_row(r) for r in s.worst_rows]
    timing = []
    if s.elapsed_s is not None:
        timing.append(f"elapsed {s.elapsed_s:.0f} s")
    if s.eta_s is not None:
        timing.append(f"ETA {s.eta_s:.0f} s")
    if timing:
        lines.append(", ".join(timing))
    if s.density is not None:
        lines.append(
            f"sparse density {s.density:.4g}"
            + (
                f"; last mask update at step {s.mask_update['step']} changed {s.mask_update['changed']:,} entries"
                if s.mask_update
                else "; no mask update yet"
            )
        )
    if s.checkpoints:
        lines.append(f"checkpoints: steps {', '.join(str(c.step) for c in s.checkpoints)}")
    if s.adapter_path:
        lines.append(f"adapter: {s.adapter_path}")
    if s.error:
        lines.append(f"cause: {s.error}")
    if s.next_step:
        lines.append(f"next: {s.next_step}")
    for w in s.warnings:
        lines.append(f"warning: {w}")
    if s.state == "failed" and s.log_tail:
        lines.append("last log lines:\n  " + "\n  ".join(s.log_tail[-6:]))
    return "\n".join(lines)


def _scores(t: dict) -> str:
    """One evaluated target's scores on one line."""
    parts = []
    if "loss" in t:
        parts.append(f"loss {t['loss']:.4f} (perplexity {t['perplexity']:.2f})")
    for key in ("exact_match", "contains", "regex", "preference_accuracy"):
        if key in t:
            rows = t.get(f"{'preference' if key == 'preference_accuracy' else key}_rows")
            parts.append(f"{key} {t[key]:.2f} ({rows} rows)")
    if "preference_margin" in t:
        parts.append(f"margin {t['preference_margin']:+.3f}")
    return f"  {t['target']}: " + (", ".join(parts) or f"{t['rows']} rows, nothing scored")


def summarize_list(statuses: list[JobStatus]) -> str:
    if not statuses:
        return "No jobs yet. Start one with start_finetune."
    lines = []
    for s in statuses:
        progress = f"{s.step}/{s.total_steps}" if s.total_steps else "-"
        loss = f"loss {s.loss:.4f}" if s.loss is not None else ""
        lines.append(f"{s.job_id}  {s.state:<9} {s.method:<5} {s.model}  step {progress} {loss}".rstrip())
    return "\n".join(lines)
