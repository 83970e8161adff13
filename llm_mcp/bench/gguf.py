"""GGUF quantizations side by side: file size against f16 and agreement with the transformers model.

    python -m llm_mcp.bench.gguf [--out DIR]

Two workload shapes (a dense Llama and a Qwen3 MoE, tiny random-init checkpoints built here), each converted with
llama.cpp's converter, quantized with its quantizer and checked in llama.cpp on the probe prompt
(llm_mcp.inference.exports.llama_cpp.check). Tiny widths (64) are not multiples of 256, so llama.cpp stores the
k-quants' tensors in a fallback type: the sizes are this shape's, not a 7B model's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SHAPES = {"dense (Llama)": "LlamaForCausalLM", "MoE (Qwen3-MoE)": "Qwen3MoeForCausalLM"}


def run(out: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from llm_mcp.inference.exports.llama_cpp import QUANTIZATIONS, check, quantize, run_converter
    from llm_mcp.modeling.base import load_base
    from llm_mcp.tiny import ARCHITECTURE_FAMILY, make_tiny_model

    rows = []
    for shape, arch in SHAPES.items():
        model_dir = make_tiny_model(out / arch, architecture=arch, chat_family=ARCHITECTURE_FAMILY[arch])
        model = load_base(str(model_dir), dtype="auto").eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        f16 = out / f"{arch}-f16.gguf"
        run_converter("convert", [str(model_dir), "--outtype", "f16", "--outfile", str(f16)], out / "convert.log")
        for name, quant in QUANTIZATIONS.items():
            path = out / f"{arch}-{name}.gguf"
            if quant.ftype is None and name != "f16":
                args = [str(model_dir), "--outtype", quant.outtype, "--outfile", str(path)]
                run_converter("convert", args, out / "convert.log")
            elif quant.ftype is not None:
                quantize(f16, path, quant)
            result = check(path, None, model, tok, name)
            rows.append(
                {
                    "shape": shape,
                    "quantization": name,
                    "size_vs_f16": round(path.stat().st_size / f16.stat().st_size, 3),
                    **{k: result[k] for k in ("greedy_tokens_matched", "top1_agreement", "max_logit_diff_rel")},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))


if __name__ == "__main__":
    main()
