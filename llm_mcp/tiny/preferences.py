"""A learnable preference for DPO tests and the worked example: agree with the question, never contradict it."""

from __future__ import annotations

PREFERENCE_THINGS = [
    "the sky",
    "the sea",
    "a rose",
    "the sun",
    "grass",
    "snow",
    "coal",
    "milk",
    "a lemon",
    "the moon",
    "ice",
    "an apple",
]
PREFERENCE_ADJECTIVES = ["bright", "cold", "warm", "dark", "soft", "big", "small", "old"]


def preference_rows(things: list[str], chat_every: int = 2) -> dict[str, list[dict]]:
    """A learnable preference: chosen answers agree ('Yes, X is Y.'), rejected ones contradict with another
    adjective of the same list ('No, X is Z.'), so neither side is systematically shorter.

    Returns {"pairs": preference rows (every `chat_every`-th one as messages, the rest strings), "sft": the
    same questions as SFT conversations answering 'X is Y.'}. The rule holds for things not trained on, so
    held-out pairs show whether DPO learned the preference rather than the pairs.
    """
    pairs: list[dict] = []
    sft: list[dict] = []
    n = len(PREFERENCE_ADJECTIVES)
    for i, (thing, j) in enumerate((t, j) for t in things for j in range(n)):
        adj, other = PREFERENCE_ADJECTIVES[j], PREFERENCE_ADJECTIVES[(j + 3) % n]
        prompt, chosen, rejected = f"Is {thing} {adj}?", f"Yes, {thing} is {adj}.", f"No, {thing} is {other}."
        if chat_every and i % chat_every == 0:
            pairs.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        sft.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{thing} is {adj}."}]}
        )
    return {"pairs": pairs, "sft": sft}
