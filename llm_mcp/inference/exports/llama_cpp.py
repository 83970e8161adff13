"""llama.cpp for GGUF exports: its own converter, its quantizer, and a check that the file runs as it should.

The converter (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion` and `gguf-py` packages) is
taken from the source distribution of the installed llama-cpp-python, so it is the same llama.cpp revision as
the library that quantizes and loads the files: `llm-mcp setup-gguf` puts it under
<prefix>/share/llm_mcp/llama.cpp-<version> (LLM_MCP_LLAMA_CPP: a llama.cpp checkout instead).

    python -m llm_mcp.inference.exports.llama_cpp convert|lora ARGS...   the converter, run in its own process

Nothing here imports llama_cpp or torch at module level: the server only asks whether they are installed.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import InvalidArgumentError

DISTRIBUTION = "llama_cpp_python"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
SETUP_HINT = "run `llm-mcp setup-gguf` (it installs llama-cpp-python's converter; `pip install 'llm-mcp[gguf]'` first)"


@dataclass(frozen=True)
class Quantization:
    """One GGUF quantization: the converter's output type, then llama.cpp's quantizer type (None: none needed)."""

    outtype: str
    ftype: str | None  # the llama_cpp LLAMA_FTYPE_MOSTLY_* constant
    bits: float  # about how many bits a weight takes (the disk estimate)
    exact: bool  # the greedy continuation must match the transformers model token for token


QUANTIZATIONS: dict[str, Quantization] = {
    "f16": Quantization("f16", None, 16, True),
    "bf16": Quantization("bf16", None, 16, False),
    "q8_0": Quantization("q8_0", None, 8.5, False),
    "q6_k": Quantization("f16", "LLAMA_FTYPE_MOSTLY_Q6_K", 6.6, False),
    "q5_k_m": Quantization("f16", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7, False),
    "q4_k_m": Quantization("f16", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9, False),
}
MIN_TOP1_AGREEMENT = 0.5  # a quantized file whose top-1 tokens agree less than this on the probe is refused
CHECK_TOKENS = 16  # greedy tokens compared after the probe prompt
PROBE_MESSAGE = "The quick brown fox jumps over the lazy dog. Name three colours and count from 1 to 5."


def installed_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def converter_dir() -> Path | None:
    """Where the converter is (None: not set up)."""
    if os.environ.get("LLM_MCP_LLAMA_CPP"):
        root = Path(os.environ["LLM_MCP_LLAMA_CPP"]).expanduser()
    elif (version := installed_version()) is not None:
        root = _unpacked(version)
    else:
        return None
    return root if _complete(root) else None


def _unpacked(version: str) -> Path:
    """Where `llm-mcp setup-gguf` puts the converter of llama-cpp-python `version`."""
    return Path(sys.prefix) / "share" / "llm_mcp" / f"llama.cpp-{version}"


def _complete(root: Path) -> bool:
    return all((root / name).exists() for name in CONVERTER_FILES)


def require_llama_cpp() -> Path:
    """The converter's directory; a clear refusal when llama-cpp-python or the converter is missing."""
    if installed_version() is None:
        raise InvalidArgumentError(
            "format='gguf' needs llama-cpp-python, which is not installed here: pip install 'llm-mcp[gguf]' (it "
            "compiles llama.cpp, a few minutes), then `llm-mcp setup-gguf`; or export format='merged' and convert "
            "it with llama.cpp yourself"
        )
    found = converter_dir()
    if found is None:
        raise InvalidArgumentError(f"format='gguf': llama.cpp's converter is not set up here; {SETUP_HINT}")
    return found


def setup_converter(sdist: Path | None = None) -> Path:
    """Unpack the converter from the installed llama-cpp-python's source distribution (downloaded by pip unless
    `sdist` is given) into <prefix>/share/llm_mcp/llama.cpp-<version>; returns that directory."""
    version = installed_version()
    if version is None:
        raise SystemExit("llama-cpp-python is not installed: pip install 'llm-mcp[gguf]' first")
    target = _unpacked(version)
    if _complete(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
                + [f"llama-cpp-python=={version}", "-d", tmp],
                check=True,
            )
            sdist = next(Path(tmp).glob("*.tar.gz"))
        staging = Path(tmp) / "staging"
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in CONVERTER_FILES:
                    member.name = str(Path(*parts[3:]))
                    members.append(member)
            tar.extractall(staging, members=members, filter="data")
        missing = [name for name in CONVERTER_FILES if not (staging / name).exists()]
        if missing:
            raise SystemExit(f"{sdist} has no vendor/llama.cpp/{missing[0]}: not a llama-cpp-python sdist?")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    return target


def setup_command(args: Any) -> int:
    """`llm-mcp setup-gguf [--sdist FILE]`."""
    print(f"llama.cpp converter: {setup_converter(Path(args.sdist) if args.sdist else None)}")
    return 0


# ---- the converter, in its own process -------------------------------------------------------------------


def known_pretokenizer(tokenizer: Any) -> str | None:
    """llama.cpp's name for the loaded tokenizer's pre-tokenizer when it is exactly one llama.cpp implements:
    GPT-2's (byte-level with its regex) or Qwen2's (its regex split, then byte-level; NFC as Qwen's own
    tokenizers have); None otherwise."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2

    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except (AttributeError, ValueError):
        return None
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if pre.get("add_prefix_space") or normalizer not in (None, {"type": "NFC"}):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and normalizer is None:
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (
        pre.get("type") == "Sequence"
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern") == {"Regex": QWEN2}
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        return "qwen2"
    return None


def convert_main(argv: list[str]) -> int:
    """Run llama.cpp's converter. One addition: a BPE tokenizer whose hash llama.cpp does not list (a trained
    vocabulary of its own) but whose pre-tokenizer is exactly one llama.cpp implements is converted with that
    pre-tokenizer (`known_pretokenizer`); the export's check then compares llama.cpp's tokens with transformers'."""
    kind, args = argv[0], argv[1:]
    root = require_llama_cpp()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import conversion.base as base  # the converter's own package

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if (name := known_pretokenizer(tokenizer)) is not None:
                return name
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre  # type: ignore[method-assign]
    script = root / ("convert_hf_to_gguf.py" if kind == "convert" else "convert_lora_to_gguf.py")
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def run_converter(kind: str, args: list[str], log: Path) -> None:
    """convert / lora in a child process (the converter imports its own gguf package); its output goes to `log`."""
    with log.open("a") as out:
        done = subprocess.run(
            [sys.executable, "-m", "llm_mcp.inference.exports.llama_cpp", kind, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if done.returncode != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        cause = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "")
        raise RuntimeError(f"llama.cpp's converter failed ({kind}): {cause.strip()[:400]}")


def quantize(source: Path, dest: Path, quant: Quantization) -> None:
    """llama.cpp's quantizer (llama_model_quantize), all cores."""
    import ctypes

    import llama_cpp

    assert quant.ftype is not None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant.ftype)
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({quant.ftype}, code {rc})")


# ---- the check: llama.cpp against the transformers model the file came from -------------------------------


def probe_prompt(tokenizer: Any) -> str:
    """The chat prompt the check runs: one user turn, rendered by the model's template (plain text without one)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": PROBE_MESSAGE}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PROBE_MESSAGE


def check(model_file: Path, lora_file: Path | None, reference: Any, tokenizer: Any, quant: str) -> dict[str, Any]:
    """Load the GGUF (with the adapter GGUF applied) in llama.cpp and compare it with `reference`, the
    transformers model it was converted from, on the probe prompt: the tokens of the prompt, then the reference's
    greedy continuation (CHECK_TOKENS) teacher-forced through both, top-1 token by token."""
    import llama_cpp
    import torch

    text = probe_prompt(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the greedy continuation; its step logits are the reference's at positions first...
        out = reference(input_ids=torch.tensor([ids]), use_cache=True)
        greedy, rows = [], []
        for step in range(CHECK_TOKENS):
            rows.append(out.logits[0, -1].float())
            greedy.append(int(rows[-1].argmax()))
            if step + 1 < CHECK_TOKENS:
                out = reference(
                    input_ids=torch.tensor([greedy[-1:]]), past_key_values=out.past_key_values, use_cache=True
                )
        sequence = ids + greedy[:-1]
        ref_logits = torch.stack(rows).numpy()
    llm = llama_cpp.Llama(
        model_path=str(model_file),
        lora_path=str(lora_file) if lora_file else None,
        n_ctx=len(sequence) + 8,
        n_batch=len(sequence) + 8,
        n_threads=min(os.cpu_count() or 1, 8),
        logits_all=True,
        verbose=False,
        seed=0,
    )
    try:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.eval(sequence)
        scores = llm.scores[: len(sequence)]
    finally:
        llm.close()
    first = len(ids) - 1
    top1 = scores[first:].argmax(axis=-1).tolist()
    agree = [a == b for a, b in zip(top1, greedy, strict=True)]
    leading = next((i for i, ok in enumerate(agree) if not ok), len(agree))
    scale = float(abs(ref_logits).max()) or 1.0
    return {
        "runtime": f"llama-cpp-python {installed_version()} (llama.cpp)",
        "quantization": quant,
        "prompt_tokens": len(ids),
        "tokenizer_match": theirs == ids,
        "greedy_tokens_matched": f"{leading}/{len(greedy)}",
        "top1_agreement": round(sum(agree) / len(agree), 3),
        "max_logit_diff_rel": round(float(abs(scores[first:] - ref_logits).max()) / scale, 4),
        "adapter_applied": lora_file is not None,
    }


def verdict(result: dict[str, Any], exact: bool) -> str | None:
    """Why the checked file is refused (None: it passed)."""
    if not result["tokenizer_match"]:
        return "llama.cpp tokenizes the probe prompt differently from the transformers tokenizer"
    matched, total = (int(x) for x in result["greedy_tokens_matched"].split("/"))
    if exact and matched < total:
        return f"llama.cpp's greedy continuation matched {matched} of {total} tokens of the transformers model's"
    if result["top1_agreement"] < MIN_TOP1_AGREEMENT:
        return f"top-1 agreement with the transformers model {result['top1_agreement']} < {MIN_TOP1_AGREEMENT}"
    return None


if __name__ == "__main__":
    sys.exit(convert_main(sys.argv[1:]))
