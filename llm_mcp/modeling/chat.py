"""Conversations as a model's chat template renders them, and which of their characters the loss covers.

A conversation may carry tools (the row's `tools`), assistant tool calls, tool results and the assistant's
reasoning. They are rendered the way the model's own template does (`tools=` for its tool-use format;
Qwen3's <think> blocks from `reasoning_content`, gpt-oss' analysis channel from `thinking`); a template
with no reasoning support gets the reasoning as a leading <think>...</think> in the answer, and a template
with no tool support is refused for tool rows with that reason.

The loss covers each assistant turn: from the end of its header through its content and tool calls to the
special token that closes it; tool results (and the user's turns) never. With train_reasoning=False the
reasoning text itself is left out of the loss, its surroundings kept.
"""

from __future__ import annotations

import json
from typing import Any

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


def for_template(tok, messages: list[dict[str, Any]], tools: list[dict] | None = None):
    """(messages as this model's template takes them, apply_chat_template's extra arguments).

    Raises:
        ValueError: the row uses tools and the template cannot render them.
    """
    source = tok.chat_template or ""
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if uses_tools and not ("tool_calls" in source and "tools" in source):
        raise ValueError(
            "this row has tool calls or tool results, and the model's chat template cannot render them (it has no "
            "tool support); train tool use on a model whose template has it (Llama 3.1, Qwen3, Mistral v0.3, "
            "gpt-oss), or drop the tool turns"
        )
    key = "reasoning_content" if "reasoning_content" in source else "thinking" if "thinking" in source else None
    out = []
    for message in _with_call_ids(messages, nine="length != 9" in source) if uses_tools else messages:
        m = dict(message)
        reasoning = m.pop("reasoning_content", None)
        if reasoning is not None and key:
            m[key] = reasoning
        elif reasoning is not None:
            m["content"] = f"<think>\n{reasoning}\n</think>\n\n{m['content']}"
        out.append(m)
    return out, ({"tools": tools} if tools else {})


def _with_call_ids(messages: list[dict[str, Any]], nine: bool) -> list[dict[str, Any]]:
    """Every tool call with an id and every tool result with the id of the call it answers (in order, where the
    row leaves them out); `nine`: ids of 9 letters or digits, as Mistral's template demands."""
    out, pending, renamed = [], [], {}
    for n, message in enumerate(messages):
        m = dict(message)
        if m.get("tool_calls"):
            calls = []
            for k, call in enumerate(m["tool_calls"]):
                given = call.get("id")
                ok = isinstance(given, str) and (not nine or (len(given) == 9 and given.isalnum()))
                new = given if ok else f"c{n:04d}{k:04d}"
                if given and not ok:
                    renamed[given] = new
                calls.append({**call, "id": new})
                pending.append(new)
            m["tool_calls"] = calls
        elif m["role"] == "tool":
            given = m.get("tool_call_id")
            if given in renamed:
                m["tool_call_id"] = renamed[given]
            elif given is None and pending:
                m["tool_call_id"] = pending[0]
            if m.get("tool_call_id") in pending:
                pending.remove(m["tool_call_id"])
        out.append(m)
    return out


def assistant_mask(
    tok, messages: list[dict[str, Any]], tools: list[dict] | None = None, train_reasoning: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask of the assistant tokens of every turn (see the module's docstring).

    Templates with {% generation %} markers give the mask directly. Otherwise the conversation is rendered
    once and each assistant turn is located in that text (templates may render earlier turns differently
    from the last one, e.g. Qwen3 drops their <think> blocks, so renders of message prefixes cannot be
    diffed): a turn runs from the end of the assistant header (what add_generation_prompt appends) through
    its content and the special token that closes it (<|eot_id|>, <end_of_turn>, </s>, <|im_end|>, <|end|> ...).
    """
    rendered, kwargs = for_template(tok, messages, tools)
    reasoning = [m.get("reasoning_content") for m in messages]
    if "{% generation %}" in (tok.chat_template or "") and (train_reasoning or not any(reasoning)):
        enc = tok.apply_chat_template(
            rendered, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
        )
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    text = tok.apply_chat_template(rendered, tokenize=False, **kwargs)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_char_spans(tok, rendered, text, kwargs)
    if not train_reasoning:
        spans = _without(spans, [r for r in reasoning if r], text)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _without(spans: list[tuple[int, int]], texts: list[str], text: str) -> list[tuple[int, int]]:
    """`spans` with the first occurrence of each of `texts` inside them cut out."""
    out = list(spans)
    for cut in texts:
        for i, (s, e) in enumerate(out):
            at = text.find(cut, s, e)
            if at >= 0:
                out[i : i + 1] = [(s, at), (at + len(cut), e)]
                break
    return [(s, e) for s, e in out if e > s]


def assistant_char_spans(
    tok, messages: list[dict[str, Any]], text: str, kwargs: dict | None = None
) -> list[tuple[int, int]]:
    """[start, end) character spans of each assistant turn in `text`, the conversation rendered by the template.

    A turn starts after the next assistant header (for a template without one, Mistral / Llama 2, where the
    render of the messages before it ends), holds the message's content or tool calls, and ends with the first
    special token after them (tokens inside the turn, like gpt-oss' <|channel|>, come before the content).
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
            prefix = messages[:i]
            prompt = tok.apply_chat_template(prefix, tokenize=False, add_generation_prompt=True, **(kwargs or {}))
            prompt = prompt if i else ""
            start = len(prompt) if i and text.startswith(prompt) and len(prompt) >= cursor else cursor
        found = _anchor(text, message, start)
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


def _anchor(text: str, message: dict[str, Any], start: int) -> tuple[int, int] | None:
    """Where the turn's own text is: its content, and after it each tool call's name and its arguments' keys and
    values, in order (templates write the arguments in their own JSON style, so each piece is found alone)."""
    found = _find_content(text, message.get("content") or "", start)
    cursor = found[1] if found else start
    first = found[0] if found else None
    for call in message.get("tool_calls") or []:
        name = call["function"]["name"]
        at = text.find(name, cursor)
        if at < 0:
            return None
        first = at if first is None else first
        cursor = at + len(name)
        for piece in _pieces(call["function"].get("arguments") or {}):
            at = text.find(piece, cursor)
            cursor = at + len(piece) if at >= 0 else cursor
    return None if first is None else (first, cursor)


def _pieces(value: Any) -> list[str]:
    """The keys and leaf values of a tool call's arguments as a template writes them, in order."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in [str(k), *_pieces(v)]]
    if isinstance(value, list):
        return [p for v in value for p in _pieces(v)]
    return [value if isinstance(value, str) else json.dumps(value)]


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


def closing_token(tok) -> str | None:
    """The special token the chat template closes an assistant turn with (None: no template, or none found)."""
    return _template_facts(tok)[2] if tok.chat_template else None


def end_of_turn_ids(tok, model=None) -> list[int]:
    """Every id generation stops on: the model's generation config eos ids (Llama 3 lists three), the tokenizer's,
    and the token the chat template closes an assistant turn with (Qwen3-Base: <|im_end|>, its eos <|endoftext|>)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    closing = closing_token(tok)
    ids += [tok.eos_token_id] + ([tok.convert_tokens_to_ids(closing)] if closing else [])
    return [i for i in dict.fromkeys(ids) if i is not None]


def chat_ids(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the chat template."""
    enc = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(enc["input_ids"])
