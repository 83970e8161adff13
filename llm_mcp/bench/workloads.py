"""The workload shapes `bench train` measures: a model built from a config (random init) + generated data.

  prompt-heavy  prompt + short completion rows (the completion is 10-30% of the tokens), a large
                vocabulary: most positions carry no label, and the LM head is a big share of the FLOPs.
  chat          multi-turn conversations whose assistant turns are 60-90% of the tokens, mixed lengths,
                a small vocabulary: almost every position is trained on; the decoder dominates.

On CPU the models are small (23M-class); with `--device cuda` they are shaped like Qwen2.5-0.5B
(hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, tied head): the prompt-heavy one with its
151,936-token vocabulary, the chat one with a 32,000-token vocabulary (Llama-2's).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from llm_mcp.bench.common import BENCH_MODEL, TINY_MODEL, WORDS
from llm_mcp.tiny import QWEN25_05B


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    model: dict = field(default_factory=dict)  # make_tiny_model keyword arguments
    completion_share: tuple[float, float] = (0.2, 0.6)
    chat: bool = False
    max_tokens: int = 512


def workloads(device: str, tiny: bool) -> list[Workload]:
    """The two shapes for this device (`tiny`: the test model and 64-token rows, a smoke test)."""
    if tiny:
        big, small, max_tokens = dict(TINY_MODEL, model_vocab_size=4096), dict(TINY_MODEL), 64
    elif device == "cuda":
        big, small, max_tokens = (
            dict(QWEN25_05B, model_vocab_size=151936),
            dict(QWEN25_05B, model_vocab_size=32000),
            1024,
        )
    else:
        big, small, max_tokens = (
            dict(BENCH_MODEL),
            {k: v for k, v in BENCH_MODEL.items() if k != "model_vocab_size"},
            512,
        )
    vocab = lambda m: m.get("model_vocab_size", 512)  # noqa: E731 - the tokenizer's 512 unless padded
    return [
        Workload(
            "prompt-heavy",
            f"prompt + completion (10-30% completion), vocabulary {vocab(big):,}",
            big,
            (0.1, 0.3),
            False,
            max_tokens,
        ),
        Workload(
            "chat",
            f"multi-turn chat (60-90% assistant tokens), vocabulary {vocab(small):,}",
            small,
            (0.6, 0.9),
            True,
            max_tokens,
        ),
    ]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def write_data(w: Workload, path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` rows of this workload's shape; lengths spread evenly over [16, max_tokens] (about a word a token)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        total = rng.randint(16, w.max_tokens)
        answer = max(4, int(total * rng.uniform(*w.completion_share)))
        if not w.chat:
            lines.append(json.dumps({"prompt": _words(rng, total - answer), "completion": " " + _words(rng, answer)}))
            continue
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": _words(rng, 3)}]
        for _ in range(turns):
            messages.append({"role": "user", "content": _words(rng, (total - answer) // turns - 6)})
            messages.append({"role": "assistant", "content": _words(rng, answer // turns)})
        lines.append(json.dumps({"messages": messages}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
