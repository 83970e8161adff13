"""A task for GRPO tests and the worked example: SFT teaches the answer's form, only the reward its content.

The SFT rows answer "Pick a lucky number for X." with each digit from 1 to 8 equally often, so a model
tuned on them answers with one digit, but any of the eight: about one in eight is the one the grader wants.
The GRPO rows ask the same about other things and reward one number (TARGET, through the row's 'answer');
the rule holds for things not trained on, so held-out prompts show whether GRPO learned it. (The tiny
tokenizer has one token per digit, so the tiny model learns the form in a few dozen SFT steps.)
"""

from __future__ import annotations

TARGET = 7
DIGITS = [str(d) for d in range(1, 9)]


def question(thing: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Pick a lucky number for {thing}."}]


def reward_rows(things: list[str], repeats: int = 4) -> dict[str, list[dict]]:
    """{"sft": one conversation per (thing, digit), "prompts": each thing's question `repeats` times, with
    {"answer": TARGET}}."""
    sft = [{"messages": [*question(thing), {"role": "assistant", "content": d}]} for thing in things for d in DIGITS]
    prompts = [{"prompt": question(thing), "answer": TARGET} for _ in range(repeats) for thing in things]
    return {"sft": sft, "prompts": prompts}
