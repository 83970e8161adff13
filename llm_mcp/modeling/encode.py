"""Turn rows into (input_ids, labels): chat template for messages, loss masks, truncation; and preference
rows into (prompt, chosen, rejected) token lists for DPO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_mcp.modeling.chat import (  # noqa: F401 - the conversation helpers are used through this module too
    DEFAULT_CHAT_TEMPLATE,
    assistant_mask,
    chat_ids,
    end_of_turn_ids,
    special_ids,
    tokenizer_for,
)

IGNORE = -100


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    target_tokens: int = 0
    tokens: int = 0
    by_format: dict[str, int] = field(default_factory=dict)


def encode_row(tok, row: dict[str, Any], train_on: str, train_reasoning: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one normalized row; labels are IGNORE where no loss is taken."""
    if "messages" in row:
        ids, mask = assistant_mask(tok, row["messages"], row.get("tools"), train_reasoning)
    elif "prompt" in row:
        p = tok(row["prompt"], add_special_tokens=True)["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, mask = p + c, [0] * len(p) + [1] * len(c)
    else:
        ids = tok(row["text"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        mask = [1] * len(ids)
    if train_on == "all":
        mask = [1] * len(ids)
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def encode_rows(
    tok, rows: list[dict[str, Any]], max_seq_len: int, train_on: str, train_reasoning: bool = True
) -> tuple[list[dict], EncodeStats]:
    """Encode and truncate every row; rows left without a trainable token are dropped and counted."""
    stats = EncodeStats()
    out = []
    for row in rows:
        fmt = "messages" if "messages" in row else "prompt_completion" if "prompt" in row else "text"
        stats.by_format[fmt] = stats.by_format.get(fmt, 0) + 1
        ids, labels = encode_row(tok, row, train_on, train_reasoning)
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        n_targets = sum(1 for t in labels[1:] if t != IGNORE)
        if n_targets == 0:
            stats.dropped_empty += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        stats.target_tokens += n_targets
        out.append({"input_ids": ids, "labels": labels})
    return out, stats


def collate(examples: list[dict], pad_id: int):
    """Pad to the longest in the batch; returns input_ids, attention_mask, labels tensors."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def encode_pair(tok, pair: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen answer ids, rejected answer ids) of a normalized preference row."""
    prompt = pair["prompt"]
    if isinstance(prompt, str):
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        answer = lambda text: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
        return list(p), answer(pair["chosen"]), answer(pair["rejected"])
    prompt_turns = sum(m["role"] == "assistant" for m in prompt)
    sides = []
    for key in ("chosen", "rejected"):  # the answer: the conversation's assistant turns after the prompt's
        ids, mask = assistant_mask(tok, prompt + pair[key])
        runs = [j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1])]
        ends = [j + 1 for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
        sides.append((ids[: runs[prompt_turns]], ids[runs[prompt_turns] : ends[-1]]))
    (p, chosen), (p_rejected, rejected) = sides
    if p != p_rejected:
        raise ValueError("the chat template renders the prompt differently before the chosen and the rejected answer")
    return p, chosen, rejected


def encode_pairs(tok, rows: list[dict[str, Any]], max_seq_len: int) -> tuple[list[dict], EncodeStats]:
    """Examples {prompt, chosen, rejected} (token lists), each sequence cut to max_seq_len; a pair left
    with no answer token on either side is dropped and counted."""
    stats = EncodeStats()
    out = []
    for row in rows:
        stats.by_format["preference"] = stats.by_format.get("preference", 0) + 1
        p, c, r = encode_pair(tok, row)
        room = max_seq_len - len(p)
        if len(p) + max(len(c), len(r)) > max_seq_len:
            stats.truncated += 1
        c, r = c[: max(room, 0)], r[: max(room, 0)]
        if not c or not r:
            stats.dropped_empty += 1
            continue
        stats.examples += 1
        stats.tokens += 2 * len(p) + len(c) + len(r)
        stats.target_tokens += len(c) + len(r)
        out.append({"prompt": p, "chosen": c, "rejected": r})
    return out, stats


def pair_sequences(example: dict) -> list[dict[str, list[int]]]:
    """The chosen and rejected sequences of one example, the prompt masked out of the labels."""
    p = example["prompt"]
    return [{"input_ids": p + example[k], "labels": [IGNORE] * len(p) + example[k]} for k in ("chosen", "rejected")]


def prompt_ids(tok, prompt: str | list[dict[str, Any]]) -> list[int]:
    """A prompt to sample from: a message list through the chat template (ready for the assistant's turn), a
    string as it is."""
    if isinstance(prompt, list):
        return list(chat_ids(tok, prompt, add_generation_prompt=True))
    return list(tok(prompt, add_special_tokens=True)["input_ids"])
