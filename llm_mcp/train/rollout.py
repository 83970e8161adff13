"""A GRPO step's rollouts: sample each prompt's completions, score them, and build the training batches.

Sampling runs in-process with transformers' `generate` (the model in eval mode, KV cache on), seeded from
(seed, step, process, micro-batch): a resumed job samples exactly what the uninterrupted one did, with no
generator state to carry. Graders run here (llm_mcp.core.graders): built-ins in-process, an http grader
with one bounded call per step, the agent grader by waiting for submit_rewards (llm_mcp.core.rollouts).
A grader that fails fails the step on every process at once (`GraderFailed`); the loop then checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llm_mcp.core import rollouts as files
from llm_mcp.core.graders import score_local, total
from llm_mcp.core.reward_http import post_batch
from llm_mcp.modeling.encode import IGNORE, end_of_turn_ids


class GraderFailed(RuntimeError):
    """A grader could not score a step: the job checkpoints and fails with this cause."""

    def __init__(self, message: str, waiting: bool = False):
        super().__init__(message)
        self.waiting = waiting  # True: the agent grader did not answer in time (the job pauses)
        self.next_step = (
            "submit_rewards(job_id=this job, step=the pending step, scores=[...]) scores the completions job_status "
            "shows and resumes the job from its checkpoint"
            if waiting
            else "the checkpoint keeps the steps done: fix the grader (job_status shows the cause), then resume_from "
            "this job"
        )


def seed_of(seed: int, step: int, rank: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + micro) % (2**63 - 1)


@torch.no_grad()
def sample(obj, model, tok, prompts: list[list[int]], seed: int, device) -> list[list[int]]:
    """num_generations completions of each prompt (token ids, ending with the stop token when one came)."""
    s = obj.settings
    g, width = s.num_generations, max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(g)], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(g)], device=device)
    stop = end_of_turn_ids(tok, model)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=s.temperature,
        top_p=1.0,
        top_k=None,
        max_new_tokens=s.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=stop,
        use_cache=True,
    )
    completions = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        completions.append(row[:cut])
    return completions


def _score(obj, run, step: int, items: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Every grader's score of each item ({prompt, completion, row}), by grader label."""
    scores = [score_local(obj.graders, it["completion"], it["row"]) for it in items]
    for spec in obj.graders:
        if spec.grader == "http":
            batch = [{"prompt": it["prompt"], "completion": it["completion"], "row": it["row"]} for it in items]
            got = post_batch(spec.label, spec.url or "", batch, spec.timeout_s)
        elif spec.grader == "agent":
            got = _ask_agent(run, step, items, spec.instructions, spec.wait_s)
        else:
            continue
        for s, value in zip(scores, got):
            s[spec.label] = value
    return scores


def _ask_agent(run, step: int, items: list[dict[str, Any]], instructions: str | None, wait_s: float) -> list[float]:
    """The agent's scores for this step: show the completions, wait for submit_rewards (or a resumed job's
    predecessor's scores for the same completions)."""
    job_dir = run.job_dir
    earlier = _earlier_scores(run, step, items)
    if earlier is not None:
        return earlier
    shown = [
        {"prompt": it["prompt_text"], "completion": it["completion"], "reference": it["reference"]} for it in items
    ]
    files.write_pending(job_dir, step, shown, instructions, wait_s)
    run.log(f"step {step}: {len(items)} completions wait for the agent's scores (submit_rewards)")
    got = files.wait_scores(job_dir, step, wait_s, lambda: run.stop_requested)
    if got is None:
        if run.stop_requested:
            raise GraderFailed(f"cancelled while step {step} waited for the agent's scores", waiting=True)
        raise GraderFailed(f"no scores for step {step} within wait_s={wait_s:g} s", waiting=True)
    files.clear_pending(job_dir)
    return got


def _earlier_scores(run, step: int, items: list[dict[str, Any]]) -> list[float] | None:
    """Scores submitted to the job this one resumes, for the same completions of the same step."""
    if not run.cfg.resume_checkpoint:
        return None
    before = Path(run.cfg.resume_checkpoint).parents[1]
    pending, scores = files.read_pending(before), files.read_scores(before, step)
    if pending is None or scores is None or pending["step"] != step:
        return None
    if [p["completion"] for p in pending["items"]] != [it["completion"][: files.SHOWN_CHARS] for it in items]:
        raise GraderFailed(f"step {step} sampled other completions than the ones scored in {before.name}")
    files.clear_pending(before)  # answered: that job no longer waits
    return scores


def _sequences(prompt: list[int], completions: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"input_ids": prompt + c, "labels": [IGNORE] * len(prompt) + c} for c in completions]


def rollout(obj, run, s, groups: list[list[dict]], step: int) -> list[dict[str, torch.Tensor]]:
    """The step's training batches, one per micro-batch: sequences, advantages, and the reference log-probs."""
    from llm_mcp.modeling.encode import collate
    from llm_mcp.train.fsdp import is_fsdp

    acc, tok, g = run.accelerator, s.tok, obj.settings.num_generations
    if is_fsdp(acc):
        raise ValueError("GRPO samples with the whole model on each process; it does not run sharded (FSDP) yet")
    t0 = time.perf_counter()
    was_training = s.model.training
    s.model.eval()
    sampled = [
        sample(
            obj,
            s.model,
            tok,
            [e["prompt"] for e in examples],
            seed_of(obj.seed, step, acc.process_index, m),
            acc.device,
        )
        for m, examples in enumerate(groups)
    ]
    obj.timing[0] += time.perf_counter() - t0
    obj.timing[1] += sum(len(c) for batch in sampled for c in batch)
    items = []
    for examples, completions in zip(groups, sampled):
        for i, c in enumerate(completions):
            e = examples[i // g]
            items.append(
                {
                    "prompt_text": tok.decode(e["prompt"], skip_special_tokens=False),
                    "prompt": e["row"]["prompt"],
                    "completion": tok.decode(c, skip_special_tokens=True),
                    "row": e["row"],
                    "reference": {k: v for k, v in e["row"].items() if k != "prompt"},
                }
            )
    failure, waiting, scores = "", False, []
    try:
        scores = _score(obj, run, step + 1, items)
    except GraderFailed as exc:
        failure, waiting = str(exc), exc.waiting
    except (RuntimeError, ValueError) as exc:  # a bad reference in a row, an http grader's failure
        failure = str(exc)
    flags = acc.reduce(torch.tensor([float(bool(failure)), float(waiting)], device=acc.device), "max")
    if flags[0] > 0:
        raise GraderFailed(failure or "another process's grader failed (its log says why)", waiting=bool(flags[1] > 0))
    rewards = torch.tensor([total(obj.graders, sc) for sc in scores], dtype=torch.float64)
    batches, records, k = [], [], 0
    for examples, completions in zip(groups, sampled):
        n = len(completions)
        advantages, std = _advantages(obj, rewards[k : k + n])
        obj.add_scores(rewards[k : k + n], scores[k : k + n], std, sum(len(c) for c in completions))
        seqs = [q for j, e in enumerate(examples) for q in _sequences(e["prompt"], completions[j * g : (j + 1) * g])]
        batch = collate(seqs, tok.pad_token_id)
        batch["advantages"] = advantages.float()
        if obj.start is not None:
            batch["ref_logps"] = _reference_logps(obj, s, batch, acc.device)
        batches.append(batch)
        for j in range(n):
            it = items[k + j]
            records.append(
                {
                    "step": step + 1,
                    "prompt": it["prompt_text"],
                    "completion": it["completion"],
                    "scores": scores[k + j],
                    "reward": round(float(rewards[k + j]), 6),
                    "advantage": round(float(advantages[j]), 6),
                }
            )
        k += n
    s.model.train(was_training)
    _keep(run, records)
    return batches


def group_advantages(rewards: torch.Tensor, generations: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each completion, its group's reward std): rewards are grouped by prompt, G at a time."""
    grouped = rewards.view(-1, generations)
    std = grouped.std(dim=1, keepdim=True)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (std + 1e-4)
    return advantages.flatten(), std.expand_as(grouped).flatten()


def _advantages(obj, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return group_advantages(rewards.float(), obj.settings.num_generations, obj.settings.scale_rewards)


@torch.no_grad()
def _reference_logps(obj, s, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Per-token log-probs of the completions under the starting weights (swapped in for this forward)."""
    from llm_mcp.modeling.positions import TokenLogps

    now = [p.data for p, _ in obj.start]
    for p, start in obj.start:
        p.data = start
    try:
        logps, _ = TokenLogps(s.model)(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
    finally:
        for (p, _), current in zip(obj.start, now):
            p.data = current
    return logps.detach().cpu()


def _keep(run, records: list[dict[str, Any]]) -> None:
    """Append the step's rollouts (every process's) to rollouts.jsonl."""
    from accelerate.utils import gather_object

    acc = run.accelerator
    everything = gather_object(records) if acc.num_processes > 1 else records
    if acc.is_main_process:
        files.append_rollouts(run.job_dir, everything)
