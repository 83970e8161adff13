"""Turn rows into (input_ids, labels): chat template for messages, loss masks, truncation; and preference
rows into (prompt, chosen, rejected) token lists for DPO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE = -100
# Models without a chat template get ChatML-style headers with {% generation %} markers (exact assistant masks);
# each assistant turn ends with the tokenizer's own eos token, a real token the model learns to stop on.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_for(path: str, trust_remote_code: bool = False):
    """The model's tokenizer as training uses it: a pad token, and a chat template if it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    target_tokens: int = 0
    tokens: int = 0
    by_format: dict[str, int] = field(default_factory=dict)


def _assistant_spans(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask of the assistant tokens of every turn.

    Templates with {% generation %} markers give the mask directly. Otherwise the conversation is rendered
    once and each assistant turn is located in that text (templates may render earlier turns differently
    from the last one, e.g. Qwen3 drops their <think> blocks, so renders of message prefixes cannot be
    diffed): a turn runs from the end of the assistant header (what add_generation_prompt appends) through
    its content and the special token that closes it (<|eot_id|>, <end_of_turn>, </s>, <|im_end|>, <|end|> ...).
    """
    if "{% generation %}" in (tok.chat_template or ""):
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_char_spans(tok, messages, text)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def assistant_char_spans(tok, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of each assistant turn in `text`, the conversation rendered by the template.

    A turn starts after the next assistant header (for a template without one, Mistral / Llama 2, where the
    render of the messages before it ends), holds the message's content, and ends with the first special
    token after that content (tokens inside the turn, like gpt-oss' <|channel|>, come before the content).
    """
    header, specials, _ = _template_facts(tok)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = cursor
        if header:
            at = text.find(header, cursor)
            start = at + len(header) if at >= 0 else len(text)
        else:
            prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            start = len(prompt) if i and text.startswith(prompt) and len(prompt) >= cursor else cursor
        found = _find_content(text, message.get("content") or "", start)
        if found is None:
            raise ValueError(
                f"messages[{i}] (assistant): the chat template renders this turn in a form its content "
                "cannot be found in, so its tokens cannot be masked; add {% generation %} markers to the "
                "template or use prompt/completion rows"
            )
        if not header and start == cursor:  # a template that drops a message (Mistral's system): after [/INST]
            start = max([cursor] + [at + len(t) for t in specials if (at := text.rfind(t, cursor, found[0])) >= 0])
        end = found[1]
        limit = text.find(header, end) if header else -1
        closing = [(at, -len(t)) for t in specials if (at := text.find(t, end, len(text) if limit < 0 else limit)) >= 0]
        if closing:
            at, minus_len = min(closing)
            end = at - minus_len
        spans.append((start, end))
        cursor = end
    return spans


_FACTS: dict[tuple[int, str], tuple[str, list[str], str | None]] = {}


def _template_facts(tok) -> tuple[str, list[str], str | None]:
    """(the assistant header add_generation_prompt appends, the special tokens longest first, the token that closes
    an assistant turn), once per tokenizer and template."""
    key = (id(tok), tok.chat_template or "")
    if key not in _FACTS:
        probe = [{"role": "user", "content": "Hi"}]
        plain = tok.apply_chat_template(probe, tokenize=False)
        prompted = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        header = prompted[len(plain) :] if prompted.startswith(plain) else ""
        specials = sorted(tok.convert_ids_to_tokens(sorted(special_ids(tok))), key=len, reverse=True)
        _FACTS[key] = (header, specials, None)  # what finding the probe's turn below needs (it calls back here)
        closing = None
        try:
            turn = [*probe, {"role": "assistant", "content": "Hello"}]
            text = tok.apply_chat_template(turn, tokenize=False)
            end = assistant_char_spans(tok, turn, text)[-1][1]
            closing = next((t for t in specials if text.endswith(t, 0, end)), None)
        except Exception:  # a template that cannot render the probe has no known closing token
            pass
        _FACTS[key] = (header, specials, closing)
    return _FACTS[key]


def special_ids(tok) -> set[int]:
    """The ids of the tokenizer's special tokens, added control tokens (<end_of_turn>, <|eot_id|> ...) included."""
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def _find_content(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """Where the template put `content` (as is, trimmed, or without a <think> block): the first at or after `cursor`."""
    candidates = [content, content.strip()]
    if "</think>" in content:
        candidates.append(content.split("</think>")[-1].strip())
    found = [(at, -len(c)) for c in candidates if c and (at := text.find(c, cursor)) >= 0]
    if not found:
        return None
    at, minus_len = min(found)  # the first place any form occurs (a later user turn may repeat the content)
    return at, at - minus_len


def end_of_turn_ids(tok, model=None) -> list[int]:
    """Every id generation stops on: the model's generation config eos ids (Llama 3 lists three), the tokenizer's,
    and the token the chat template closes an assistant turn with (Qwen3-Base: <|im_end|>, its eos <|endoftext|>)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    closing = _template_facts(tok)[2] if tok.chat_template else None
    ids += [tok.eos_token_id] + ([tok.convert_tokens_to_ids(closing)] if closing else [])
    return [i for i in dict.fromkeys(ids) if i is not None]


def chat_ids(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the chat template."""
    enc = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(enc["input_ids"])


def encode_row(tok, row: dict[str, Any], train_on: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one normalized row; labels are IGNORE where no loss is taken."""
    if "messages" in row:
        ids, mask = _assistant_spans(tok, row["messages"])
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


def encode_rows(tok, rows: list[dict[str, Any]], max_seq_len: int, train_on: str) -> tuple[list[dict], EncodeStats]:
    """Encode and truncate every row; rows left without a trainable token are dropped and counted."""
    stats = EncodeStats()
    out = []
    for row in rows:
        fmt = "messages" if "messages" in row else "prompt_completion" if "prompt" in row else "text"
        stats.by_format[fmt] = stats.by_format.get(fmt, 0) + 1
        ids, labels = encode_row(tok, row, train_on)
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
        ids, mask = _assistant_spans(tok, prompt + pair[key])
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
