"""Activation memory, counted against the estimate, per method at a real model's widths.

    python -m llm_mcp.bench.activations [--shape llama-3.1-8b|qwen3-8b] [--dtype bf16|fp32]

The counting is llm_mcp.modeling.activations (tests/test_estimates.py uses it too).
"""

from __future__ import annotations

import argparse
import json

from llm_mcp.modeling.activations import ALL_LINEAR, SHAPES, count_layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_mcp.bench.activations", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    from llm_mcp.core.estimates import layer_activation_bytes

    _, dims = SHAPES[args.shape]
    elem = 2 if args.dtype == "bf16" else 4
    for method, dropout in [(None, 0.0), ("lora", 0.0), ("lora", 0.05), ("dora", 0.0), ("sparse", 0.0)]:
        count = count_layer(args.shape, method, dropout, False, args.dtype)
        est = layer_activation_bytes(dims, method, ALL_LINEAR, 32, dropout, elem)
        row = {
            "method": method or "frozen block",
            "dropout": dropout,
            "counted_per_token_h": round(count.per_token / dims.hidden_size, 1),
            "estimated_per_token_h": round(est.per_token / dims.hidden_size, 1),
            "counted_fixed_mb": round(count.fixed / 2**20, 1),
            "estimated_fixed_mb": round(est.fixed / 2**20, 1),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
