"""Evaluation jobs: score the base model and job adapters on one dataset, side by side.

    python -m llm_mcp.inference.evaluate JOB_DIR      (started by the executor, like a training job)

For every target and row (the first `max_rows`):
  - loss: mean next-token cross-entropy over the answer tokens (what training minimises; the
    completion / assistant tokens of SFT rows, the whole text of text rows), and its perplexity;
  - with a reference answer (prompt_completion rows: the completion; messages rows: the last
    assistant turn) and generate=true: a greedy generation of up to max_tokens, scored by
    exact_match (equal after trimming, collapsing whitespace and case), contains (the reference
    appears in the generation) and regex (the row's "regex" field or the call's pattern matches);
  - preference rows: whether the target gives the chosen answer a higher log-probability than
    the rejected one (preference_accuracy), and the mean log-probability margin.
Per-row results go to eval_rows.jsonl; the summary to result.json. SIGTERM stops between rows
and keeps what was scored. Imports torch; never the MCP SDK.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from llm_mcp.core.jobconfig import EvalConfig, EvalTarget
from llm_mcp.core.jobdir import append_metric, cancel_requested, write_result

STOP = threading.Event()
INPUT_SHOWN = 500  # characters of a row's input kept beside its scores


def reference_of(row: dict[str, Any]) -> tuple[dict[str, Any], str | None] | None:
    """(the prompt as sample() takes it, the reference answer) of a normalized SFT row (a prompt row has no
    reference answer: None); None for text rows."""
    if "prompt" in row and "completion" not in row:
        prompt = row["prompt"]
        return ({"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}), None
    if "completion" in row:
        return {"prompt": row["prompt"]}, row["completion"]
    if "messages" in row:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if last > 0:
            return {"messages": msgs[:last]}, msgs[last]["content"]
    return None


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def score_generation(generated: str, reference: str, pattern: str | None) -> dict[str, bool]:
    scores = {"exact_match": _norm(generated) == _norm(reference), "contains": _norm(reference) in _norm(generated)}
    if pattern:
        scores["regex"] = re.search(pattern, generated) is not None
    return scores


def summarize(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """One target's scores over its per-row results."""
    mine = [r for r in rows if r["target"] == label]
    out: dict[str, Any] = {"target": label, "rows": len(mine)}
    lossy = [r for r in mine if "loss" in r]
    tokens = sum(r["tokens"] for r in lossy)
    if tokens:
        loss = sum(r["loss"] * r["tokens"] for r in lossy) / tokens
        out.update(loss=round(loss, 6), perplexity=round(math.exp(min(loss, 50)), 4), loss_tokens=tokens)
    rewarded = [r["reward"] for r in mine if "reward" in r]
    if rewarded:
        out.update(reward=round(sum(rewarded) / len(rewarded), 4), reward_rows=len(rewarded))
        for label in mine[0].get("scores", {}):
            out[f"reward/{label}"] = round(sum(r["scores"][label] for r in mine if "scores" in r) / len(rewarded), 4)
    for key in ("exact_match", "contains", "regex", "preferred"):
        scored = [r[key] for r in mine if key in r]
        if scored:
            out["preference_accuracy" if key == "preferred" else key] = round(sum(scored) / len(scored), 4)
            out[f"{'preference' if key == 'preferred' else key}_rows"] = len(scored)
    margins = [r["margin"] for r in mine if "margin" in r]
    if margins:
        out["preference_margin"] = round(sum(margins) / len(margins), 4)
    return out


class Scorer:
    """Loads the base once per (quantized, sparse) kind and switches adapters, through the in-process sampler."""

    def __init__(self, cfg: EvalConfig):
        from llm_mcp.inference.sampling import TransformersSampler

        self.cfg = cfg
        self.sampler = TransformersSampler(max_bases=1, max_adapters=len(cfg.targets))

    def _target(self, t: EvalTarget):
        from llm_mcp.inference.targets import Target

        m = self.cfg.model
        return Target(
            base_path=m.path,
            base_id=m.id,
            adapter_path=t.adapter_path,
            quantized=t.quantized,
            layout=t.layout,
            trust_remote_code=m.trust_remote_code,
        )

    def logps(self, t: EvalTarget, sequences: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """(sum of log p over label tokens, label token count) of each (input_ids, labels) sequence."""
        import torch

        from llm_mcp.modeling.encode import IGNORE, collate
        from llm_mcp.modeling.positions import SequenceLogps

        with self.sampler.using(self._target(t)) as base:
            batch = collate(
                [
                    {"input_ids": i[: self.cfg.max_seq_len], "labels": lab[: self.cfg.max_seq_len]}
                    for i, lab in sequences
                ],
                base["tokenizer"].pad_token_id,
            )
            batch = {k: v.to(base["device"]) for k, v in batch.items()}
            with torch.inference_mode():
                sums = SequenceLogps(base["model"])(batch["input_ids"], batch["attention_mask"], batch["labels"])
            counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
        return [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist())]

    def generate(self, t: EvalTarget, prompt: dict[str, Any]) -> str:
        from llm_mcp.inference.sampling import SampleParams

        params = SampleParams(
            prompt=prompt.get("prompt"),
            messages=prompt.get("messages"),
            max_tokens=self.cfg.max_tokens,
            temperature=0.0,
        )
        return self.sampler.generate(self._target(t), params).completions[0].text

    def tokenizer(self):
        with self.sampler.using(self._target(self.cfg.targets[0])) as base:
            return base["tokenizer"]


def score_row(scorer: Scorer, tok, t: EvalTarget, row: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """One row's results for one target."""
    from llm_mcp.modeling.preview import sequences

    seqs = sequences(tok, row, "completion")
    logps = scorer.logps(t, seqs)
    if "chosen" in row:
        (chosen, _), (rejected, _) = logps
        return {"preferred": chosen > rejected, "margin": round(chosen - rejected, 6)}
    ((total, n),) = logps
    out: dict[str, Any] = {"loss": round(-total / max(n, 1), 6), "tokens": n} if n else {}
    ref = reference_of(row)
    if ref is not None and (scorer.cfg.generate or answer_less(ref)):
        prompt, answer = ref
        text = scorer.generate(t, prompt)
        shown = prompt.get("prompt") or next(
            (m["content"] for m in reversed(prompt.get("messages") or []) if m["role"] == "user"), ""
        )
        out.update(input=shown[:INPUT_SHOWN], generated=text)
        if answer is not None:
            out.update(reference=answer, **score_generation(text, answer, raw.get("regex") or scorer.cfg.regex))
        if scorer.cfg.graders:
            out.update(grade(scorer.cfg.graders, prompt, text, {**raw, **row}))
    return out


def answer_less(ref: tuple[dict[str, Any], str | None]) -> bool:
    return ref[1] is None


def grade(graders, prompt: dict[str, Any], text: str, row: dict[str, Any]) -> dict[str, Any]:
    """{scores: by grader, reward: their weighted sum} of one generation (an http grader: one call per row)."""
    from llm_mcp.core.graders import score_local, total
    from llm_mcp.core.reward_http import post_batch

    scores = score_local(graders, text, row)
    for spec in graders:
        if spec.grader == "http":
            item = {"prompt": prompt.get("prompt") or prompt.get("messages"), "completion": text, "row": row}
            scores[spec.label] = post_batch(spec.label, spec.url or "", [item], spec.timeout_s)[0]
    return {"scores": scores, "reward": round(total(graders, scores), 6)}


def evaluate(job_dir: Path) -> dict[str, Any]:
    """Score every target on the dataset's first max_rows rows; returns the result.json fields."""
    from llm_mcp.core.data import canonical_rows, check_fingerprint, source_of

    cfg = EvalConfig.read(job_dir)
    check_fingerprint(Path(cfg.dataset), cfg.dataset_fingerprint)
    rows, raw_rows = [], []
    for _, row, raw in canonical_rows(source_of(cfg.dataset, cfg.dataset_hub), cfg.columns):
        rows.append(row)
        raw_rows.append(raw)
        if len(rows) >= cfg.max_rows:
            break
    total = len(rows) * len(cfg.targets)
    append_metric(job_dir, {"event": "start", "total_steps": total, "rows": len(rows), "targets": len(cfg.targets)})
    print(f"[{time.strftime('%H:%M:%S')}] evaluating {len(cfg.targets)} target(s) on {len(rows)} rows", flush=True)
    scorer = Scorer(cfg)
    tok = scorer.tokenizer()
    results, done, t0 = [], 0, time.time()
    with open(job_dir / "eval_rows.jsonl", "w", encoding="utf-8") as out:
        for t in cfg.targets:
            for i, (row, raw) in enumerate(zip(rows, raw_rows), 1):
                if STOP.is_set() or cancel_requested(job_dir):
                    STOP.set()
                    break
                record = {"target": t.label, "row": i, **score_row(scorer, tok, t, row, raw)}
                results.append(record)
                out.write(json.dumps(record) + "\n")
                done += 1
                if done % 8 == 0 or done == total:
                    out.flush()
                    append_metric(job_dir, {"step": done, "rows_done": done, "elapsed_s": round(time.time() - t0, 2)})
            print(f"[{time.strftime('%H:%M:%S')}] {t.label}: {json.dumps(summarize(results, t.label))}", flush=True)
    summary = {
        "targets": [summarize(results, t.label) for t in cfg.targets],
        "rows_file": str(job_dir / "eval_rows.jsonl"),
        "rows": len(rows),
        "complete": not STOP.is_set(),
    }
    return {
        "state": "cancelled" if STOP.is_set() else "succeeded",
        "evaluation": summary,
        "step": done,
        "total_steps": total,
    }


def main(argv: list[str] | None = None) -> int:
    job_dir = Path((sys.argv[1:] if argv is None else argv)[0]).resolve()
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())
    try:
        write_result(job_dir, evaluate(job_dir))
        return 0
    except Exception as exc:  # every failure is recorded with its cause
        traceback.print_exc()
        write_result(
            job_dir,
            {
                "state": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "next_step": "read the last log lines (job_status), fix the cause, then call evaluate again",
            },
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
