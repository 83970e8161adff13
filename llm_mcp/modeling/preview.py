"""What a job would train on, before it runs: token lengths, truncation, drops, one rendered example.

Uses the trainer's own encoding (`encode_row`) with the model's tokenizer, so the counts are the
ones the job will log. Imports transformers (and with it torch) on first use only; the server
calls it from a worker thread, within a time budget.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_mcp.core.readers import Source
from llm_mcp.modeling.encode import IGNORE, encode_pair, encode_row, pair_sequences, prompt_ids, tokenizer_for


def is_prompt_row(row: dict[str, Any]) -> bool:
    return "prompt" in row and "completion" not in row and "chosen" not in row


def sequences(
    tok, row: dict[str, Any], train_on: str, train_reasoning: bool = True
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sequence a row trains: one, or a preference row's chosen and rejected."""
    if is_prompt_row(row):  # GRPO samples the completion
        ids = prompt_ids(tok, row["prompt"])
        return [(ids, [IGNORE] * len(ids))]
    if "chosen" in row:
        p, c, r = encode_pair(tok, row)
        return [(s["input_ids"], s["labels"]) for s in pair_sequences({"prompt": p, "chosen": c, "rejected": r})]
    return [encode_row(tok, row, train_on, train_reasoning)]


HISTOGRAM_EDGES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


@dataclass
class TokenReport:
    """Token counts over the rows examined (all of them unless the time budget ran out)."""

    max_seq_len: int
    rows_examined: int = 0
    complete: bool = True
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    histogram: dict[str, int] = field(default_factory=dict)
    truncated_at: list[int] = field(default_factory=list)  # row numbers (1-based), first few
    unrenderable: int = 0  # rows the model's chat template cannot render (reasons in unrenderable_at)
    unrenderable_at: list[str] = field(default_factory=list)
    dropped_at: list[int] = field(default_factory=list)

    def warnings(self) -> list[str]:
        scope = "" if self.complete else f" (of the first {self.rows_examined} rows)"
        out = []
        if self.truncated:
            out.append(
                f"{self.truncated} row(s){scope} are longer than max_seq_len={self.max_seq_len} tokens and will "
                f"be truncated (rows {self.truncated_at}); raise max_seq_len (longest: {self.longest}) or "
                "shorten them"
            )
        if self.dropped:
            out.append(
                f"{self.dropped} row(s){scope} keep no trained token after truncation and will be dropped "
                f"(rows {self.dropped_at}); raise max_seq_len or put the answer earlier"
            )
        return out


def _bucket(n: int) -> str:
    for edge in HISTOGRAM_EDGES:
        if n <= edge:
            return f"<={edge}"
    return f">{HISTOGRAM_EDGES[-1]}"


def token_report(
    tok,
    rows: list[dict[str, Any]],
    max_seq_len: int,
    train_on: str,
    time_budget_s: float = 3.0,
    train_reasoning: bool = True,
) -> TokenReport:
    """Encode rows as the trainer does and count lengths, truncations and drops; rows this model cannot
    render (tool calls on a template without tools) are counted in `unrenderable` with the reason."""
    report = TokenReport(max_seq_len=max_seq_len)
    deadline = time.monotonic() + time_budget_s
    for i, row in enumerate(rows, 1):
        try:
            seqs = sequences(tok, row, train_on, train_reasoning)
        except ValueError as exc:
            report.unrenderable += 1
            if len(report.unrenderable_at) < 5:
                report.unrenderable_at.append(f"row {i}: {exc}")
            continue
        report.rows_examined += 1
        longest = max(len(ids) for ids, _ in seqs)
        report.tokens += sum(len(ids) for ids, _ in seqs)
        report.longest = max(report.longest, longest)
        bucket = _bucket(longest)
        report.histogram[bucket] = report.histogram.get(bucket, 0) + 1
        if longest > max_seq_len:
            report.truncated += 1
            if len(report.truncated_at) < 5:
                report.truncated_at.append(i)
        trained = [sum(1 for t in labels[1:max_seq_len] if t != IGNORE) for _, labels in seqs]
        report.trained_tokens += sum(trained)
        if min(trained) == 0 and not is_prompt_row(row):
            report.dropped += 1
            if len(report.dropped_at) < 5:
                report.dropped_at.append(i)
        if time.monotonic() > deadline and i < len(rows):
            report.complete = False
            break
    report.histogram = {k: report.histogram[k] for k in sorted(report.histogram, key=_order)}
    return report


def _order(bucket: str) -> int:
    return int(bucket.lstrip("<=>")) + (1 if bucket.startswith(">") else 0)


def render_example(tok, row: dict[str, Any], max_seq_len: int, train_on: str, train_reasoning: bool = True) -> str:
    """The row as the model sees it, trained tokens inside [[ ]], cut at max_seq_len (a preference row: its
    chosen, then its rejected sequence)."""
    seqs = sequences(tok, row, train_on, train_reasoning)
    if len(seqs) > 1:
        return "\n".join(
            f"{name}: {_render(tok, ids[:max_seq_len], labels[:max_seq_len])}"
            for name, (ids, labels) in zip(("chosen", "rejected"), seqs)
        )
    ids, labels = seqs[0]
    return _render(tok, ids[:max_seq_len], labels[:max_seq_len])


def _render(tok, ids: list[int], labels: list[int]) -> str:
    out: list[str] = []
    span: list[int] = []
    trained = False
    for token, label in zip(ids, labels):
        now = label != IGNORE
        if now != trained and span:
            text = tok.decode(span)
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
            span = []
        trained = now
        span.append(token)
    if span:
        text = tok.decode(span)
        out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(out)


def tokenizer_if_local(path: str, trust_remote_code: bool = False):
    """The tokenizer of a local model directory or a cached hub model; None if it would need a download."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not Path(path).is_dir():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "tokenizer_config.json"), str):
            return None
    try:
        return tokenizer_for(path, trust_remote_code)
    except (OSError, ValueError):
        return None


def job_token_report(cfg, max_rows: int = 20_000, time_budget_s: float = 3.0) -> TokenReport | None:
    """The token report for a job config's training rows (None if the tokenizer would need a download)."""
    tok = tokenizer_if_local(cfg.model.path, cfg.model.trust_remote_code)
    if tok is None:
        return None
    from llm_mcp.core.data import source_of

    rows = first_rows(source_of(cfg.dataset, cfg.dataset_hub), max_rows, cfg.columns)
    report = token_report(tok, rows, cfg.max_seq_len, cfg.train_on, time_budget_s, cfg.train_reasoning)
    report.complete = report.complete and len(rows) < max_rows
    return report


def first_rows(path: Source, max_rows: int, columns: Mapping[Any, str] | None = None) -> list[dict[str, Any]]:
    """The first `max_rows` rows of a validated dataset, normalized (the trainer's view)."""
    from llm_mcp.core.data import canonical_rows

    rows = []
    for _, row, _ in canonical_rows(path, columns):
        rows.append(row)
        if len(rows) >= max_rows:
            break
    return rows
