"""Row shapes shared by the SFT and preference formats: message lists, preference pairs, near-miss keys."""

from __future__ import annotations

import difflib
import json
from typing import Any

ROLES = ("system", "user", "assistant")
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


def check_messages(value: Any, key: str = "messages") -> list[dict[str, str]]:
    """A checked message list (JSON text from CSV / Parquet columns is decoded)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{key!r} is a string that is not JSON") from exc
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a non-empty list of {{role, content}}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{key}[{i}].role={m['role']!r}; allowed: {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{key}[{i}].content must be a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(
                f"{key}[{i}] is an empty assistant message: nothing to learn from it; write the answer or drop the turn"
            )
    return value


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
