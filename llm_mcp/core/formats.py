"""The dataset shapes people have, turned into the conversations training reads, and column mappings.

    alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}],
               "system"?, "tools"?}
(LLaMA-Factory's data/README.md documents both; a ShareGPT function_call turn is the assistant's tool call,
an observation the tool's result.) Any other shape trains through `columns`: a mapping from the names
training knows (prompt, completion, text, messages, instruction, input, output, chosen, rejected, ...) to
the row's own keys, e.g. {"prompt": "ticket", "completion": "expected"}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llm_mcp.core.rows import check_tools, tool_calls_of

ALPACA_KEYS = ("instruction", "input", "output", "system", "history")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# Words that usually name a question or an answer column: the hint for a row of unknown shape.
PROMPT_WORDS = ("prompt", "question", "query", "input", "instruction", "ticket", "request", "source", "problem", "q")
ANSWER_WORDS = ("completion", "answer", "response", "output", "expected", "target", "label", "reply", "solution", "a")


def alpaca_messages(row: dict[str, Any]) -> dict[str, Any]:
    """An Alpaca row as a conversation: system, the history's turns, then instruction (+ input) -> output."""
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"an Alpaca row needs {key!r} as a string (got {type(row.get(key)).__name__})")
    if not row["output"].strip():
        raise ValueError("'output' is empty: nothing to learn from")
    messages: list[dict[str, Any]] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for i, turn in enumerate(row.get("history") or []):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ValueError(f"history[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    given = row.get("input")
    prompt = row["instruction"] + (f"\n{given}" if isinstance(given, str) and given.strip() else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return {"messages": messages}


def sharegpt_messages(row: dict[str, Any]) -> dict[str, Any]:
    """A ShareGPT row as a conversation (with its tools, if any)."""
    turns = row["conversations"]
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except ValueError:
            raise ValueError("'conversations' is text that is not JSON") from None
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of {from, value}")
    messages: list[dict[str, Any]] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] must be an object with 'from' and 'value'")
        who = turn["from"]
        if who not in SHAREGPT_ROLES:
            raise ValueError(f"conversations[{i}].from={who!r}; allowed: {list(SHAREGPT_ROLES)}")
        if who == "function_call":
            call = turn["value"]
            try:
                call = json.loads(call) if isinstance(call, str) else call
            except ValueError:
                raise ValueError(f"conversations[{i}] (function_call): the value is text that is not JSON") from None
            calls = call if isinstance(call, list) else [call]
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": tool_calls_of(calls, f"conversations[{i}]")}
            )
        else:
            messages.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
    out: dict[str, Any] = {"messages": messages}
    if row.get("tools"):
        out["tools"] = check_tools(row["tools"])
    return out


def apply_columns(row: Any, columns: Mapping[Any, str] | None) -> Any:
    """The row with its own keys renamed to the names training knows (`columns`: known name -> the row's key).

    Raises:
        ValueError: the row lacks a mapped key.
    """
    if not columns or not isinstance(row, dict):
        return row
    missing = [f"{theirs!r} (for {ours!r})" for ours, theirs in columns.items() if theirs not in row]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in this row (columns maps them; found keys {sorted(row)[:8]})")
    renamed = {ours: row[theirs] for ours, theirs in columns.items()}
    return {**{k: v for k, v in row.items() if k not in columns.values()}, **renamed}


def guess_columns(keys: list[str]) -> dict[str, str] | None:
    """A `columns` mapping that the row's keys suggest ({'prompt': 'ticket', 'completion': 'expected'}), or None."""

    def pick(words: tuple[str, ...], exclude: str | None = None) -> str | None:
        ranked = [k for w in words for k in keys if k != exclude and (k.lower() == w or w in k.lower().split("_"))]
        return ranked[0] if ranked else None

    prompt = pick(PROMPT_WORDS)
    answer = pick(ANSWER_WORDS, exclude=prompt)
    return {"prompt": prompt, "completion": answer} if prompt and answer else None
