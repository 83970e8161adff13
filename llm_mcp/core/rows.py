"""Row shapes shared by the SFT and preference formats: message lists, preference pairs, near-miss keys."""

from __future__ import annotations

import difflib
import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("messages", "prompt", "completion", "text", "chosen", "rejected")
PREFERENCE_KEYS = ("chosen", "rejected", "preferred_output", "non_preferred_output")


IMAGE_KEYS = ("image", "images", "image_url", "pixel_values")


def check_no_images(row: dict[str, Any]) -> None:
    """Image + text rows are not supported yet: say so, rather than fail on a content list later."""
    keys = [k for k in IMAGE_KEYS if row.get(k)]  # an empty or null image column is no image
    messages = row.get("messages")
    parts = (
        [p for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for p in m["content"]]
        if isinstance(messages, list)
        else []
    )
    if keys or any(isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in parts):
        raise ValueError(
            f"the row has an image ({keys or 'an image content part'}): training on images is not "
            "supported yet; vision-language models fine-tune their language model on text rows "
            "(messages with string content, prompt+completion or text)"
        )


def check_messages(value: Any, key: str = "messages") -> list[dict[str, Any]]:
    """A checked, normalized message list (JSON text from CSV / Parquet columns is decoded).

    Accepted beyond {role, content}: content as a list of {type: "text", text} parts (joined); assistant
    `tool_calls` (OpenAI's shape; arguments as an object, or JSON text that is parsed) with content empty or
    null; `tool` messages (a tool's result, never trained on) with optional `tool_call_id` / `name`; the
    assistant's reasoning as `reasoning_content`, `thinking` or a leading <think>...</think> in its content
    (normalized to `reasoning_content`).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{key!r} is a string that is not JSON") from exc
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"{where}.role={role!r}; allowed: {list(ROLES)}")
        calls = tool_calls_of(m.get("tool_calls"), where) if role == "assistant" else []
        if "content" not in m and not calls:
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        content = text_of(m.get("content"), f"{where}.content")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("thinking")
            if reasoning is None and content.lstrip().startswith("<think>") and "</think>" in content:
                head, _, content = content.lstrip()[len("<think>") :].partition("</think>")
                reasoning, message["content"] = head.strip(), content.lstrip()
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise ValueError(f"{where}.reasoning_content must be a string")
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = calls
            elif not message["content"].strip():
                raise ValueError(
                    f"{where} is an empty assistant message: nothing to learn from it; write the answer or drop "
                    "the turn"
                )
        if role == "tool":
            for extra in ("tool_call_id", "name"):
                if isinstance(m.get(extra), str):
                    message[extra] = m[extra]
        out.append(message)
    return out


def text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, a list of text parts, or nothing (None: '')."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for j, part in enumerate(content):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}] is a {part.get('type')!r} part; only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"{where} must be a string or a list of {{type: 'text', text}} parts")


def tool_calls_of(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls, normalized: [{"type": "function", "function": {"name", "arguments": {...}}, "id"?}]."""
    if value in (None, []):
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}.tool_calls must be a list of {{type: 'function', function: {{name, arguments}}}}")
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}.tool_calls[{j}] needs function.name (a string)")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ValueError(f"{where}.tool_calls[{j}].function.arguments is text that is not JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}.tool_calls[{j}].function.arguments must be an object")
        normalized: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normalized["id"] = call["id"]
        calls.append(normalized)
    return calls


def check_tools(value: Any, key: str = "tools") -> list[dict[str, Any]]:
    """The tools a conversation may call: OpenAI function schemas (JSON text accepted)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{key!r} is text that is not JSON") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"{key!r} must be a list of tool schemas ({{type: 'function', function: {{name, ...}}}})")
    tools = []
    for j, tool in enumerate(value):
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{key}[{j}] needs function.name")
        tools.append({"type": "function", "function": fn})
    return tools


def found_instead(row: dict[str, Any], key: str) -> str:
    close = difflib.get_close_matches(key, [k for k in row if k not in FIELDS], 1, 0.75)
    return f" (found {close[0]!r})" if close else ""


def preference_pair(row: dict[str, Any]) -> dict[str, Any]:
    """The row as {"prompt", "chosen", "rejected"}: three strings, or a message list and two assistant lists.

    Raises:
        ValueError: what is missing or malformed, naming the field.
    """
    if "preferred_output" in row or "non_preferred_output" in row:  # OpenAI's preference fine-tuning shape
        for key in ("input", "preferred_output", "non_preferred_output"):
            if key not in row:
                raise ValueError(
                    f"missing {key!r} (rows with preferred_output need input, preferred_output and "
                    "non_preferred_output)"
                )
        given = row["input"]
        if not isinstance(given, dict) or "messages" not in given:
            raise ValueError("'input' must be an object with 'messages'")
        prompt, chosen, rejected = given["messages"], row["preferred_output"], row["non_preferred_output"]
        keys = ("input.messages", "preferred_output", "non_preferred_output")
    else:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise ValueError(
                    f"missing {key!r}{found_instead(row, key)} (preference rows need 'chosen' and "
                    "'rejected', and a 'prompt' unless both are conversations sharing it)"
                )
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        keys = ("prompt", "chosen", "rejected")
        if prompt is None:
            return _implicit_prompt(check_messages(chosen, "chosen"), check_messages(rejected, "rejected"))
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        if not chosen.strip() or not rejected.strip():
            raise ValueError("'chosen' and 'rejected' must be non-empty")
        if chosen == rejected:
            raise ValueError("'chosen' and 'rejected' are the same text: nothing to prefer")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, keys[0])
    answers = []
    for key, value in zip(keys[1:], (chosen, rejected)):
        msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else check_messages(value, key)
        if any(m["role"] != "assistant" for m in msgs) or not msgs[0]["content"].strip():
            raise ValueError(f"{key!r} must hold the assistant's answer only (a string or assistant messages)")
        answers.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if answers[0] == answers[1]:
        raise ValueError(f"{keys[1]!r} and {keys[2]!r} are the same: nothing to prefer")
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "chosen": answers[0],
        "rejected": answers[1],
    }


def _implicit_prompt(chosen: list[dict], rejected: list[dict]) -> dict[str, Any]:
    """Two whole conversations: the turns they share are the prompt, the rest the two answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or any(m["role"] != "assistant" for m in c + r):
        raise ValueError(
            "'chosen' and 'rejected' must be the same conversation up to the final assistant "
            "answer(s), or give the shared turns as 'prompt'"
        )
    if c == r:
        raise ValueError("'chosen' and 'rejected' are the same conversation: nothing to prefer")
    strip = lambda msgs: [{"role": m["role"], "content": m["content"]} for m in msgs]  # noqa: E731
    return {"prompt": strip(prompt), "chosen": strip(c), "rejected": strip(r)}


def prompt_row(row: dict[str, Any]) -> dict[str, Any]:
    """A prompt to sample from (GRPO): the prompt (a string, or a message list ending on a user or system turn)
    and the row's other fields, which graders read as references.

    Raises:
        ValueError: the prompt is empty or malformed.
    """
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
    elif isinstance(prompt, list):
        prompt = check_messages(prompt)
        if prompt[-1]["role"] == "assistant":
            raise ValueError("'prompt' ends on an assistant turn: the completion is what the job samples; drop it")
    else:
        raise ValueError(f"'prompt' must be a string or a message list, got {type(prompt).__name__}")
    return {**row, "prompt": prompt}
