"""Build tiny random-init checkpoints fully offline (tests, demo, benchmarks): every matrix architecture.

The tokenizer is a byte-level BPE trained here on a generated corpus, wrapped in
PreTrainedTokenizerFast with a ChatML chat template whose {% generation %} markers let
training mask everything but assistant tokens. head_dim is 32 because the CPU build of
vLLM rejects 16.
"""

from __future__ import annotations

from pathlib import Path

from llm_mcp.tiny.configs import QWEN25_05B, TINY_ARCHITECTURES, tiny_config
from llm_mcp.tiny.preferences import PREFERENCE_ADJECTIVES, PREFERENCE_THINGS, preference_rows
from llm_mcp.tiny.tokenizer import ARCHITECTURE_FAMILY, CHAT_FAMILIES, CHAT_TEMPLATE, tiny_tokenizer, training_corpus

__all__ = [
    "ARCHITECTURE_FAMILY",
    "CHAT_FAMILIES",
    "CHAT_TEMPLATE",
    "PREFERENCE_ADJECTIVES",
    "PREFERENCE_THINGS",
    "QWEN25_05B",
    "TINY_ARCHITECTURES",
    "make_tiny_model",
    "preference_rows",
    "tiny_config",
    "tiny_tokenizer",
    "training_corpus",
]


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    model_vocab_size: int | None = None,
    num_kv_heads: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    architecture: str = "LlamaForCausalLM",
    num_experts: int = 4,
    chat_family: str = "chatml",
    head_scale: float = 1.0,
) -> Path:
    """Write a tiny random-init model (LlamaForCausalLM unless `architecture` says otherwise) and its tokenizer
    (safetensors) to `out_dir` and return it.

    `model_vocab_size` pads the embedding / LM head beyond the tokenizer's vocabulary, so a
    benchmark model pays a realistic vocabulary projection (the extra rows are never produced).
    `num_kv_heads` / `tie_word_embeddings` give real models' shapes (grouped-query attention, tied head).
    `architecture`: one of TINY_ARCHITECTURES (MoE ones get `num_experts` experts, 2 per token).
    `chat_family`: the tokenizer's chat template and special tokens, one of CHAT_FAMILIES (ARCHITECTURE_FAMILY gives
    each architecture's own).
    `head_scale` multiplies the LM head's random init: a random head's logits span a few units (a policy that can
    never be sure of a token), a trained model's span tens; GRPO's tests need a policy that can become sharp.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = tiny_tokenizer(vocab_size, seed, chat_family)
    common = dict(
        vocab_size=max(len(tokenizer), model_vocab_size or 0),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = tiny_config(architecture, common, intermediate_size, num_experts)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if architecture.endswith("ForConditionalGeneration") else AutoModelForCausalLM
    model = auto.from_config(config)
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    stop = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_FAMILIES[chat_family]["stop"]]
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
