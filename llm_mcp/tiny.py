"""Build a tiny random-init Llama checkpoint fully offline (tests, demo, benchmarks).

The tokenizer is a byte-level BPE trained here on a generated corpus, wrapped in
PreTrainedTokenizerFast with a ChatML chat template whose {% generation %} markers let
training mask everything but assistant tokens. head_dim is 32 because the CPU build of
vLLM rejects 16.
"""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Tokenizer facts per chat family: llm_mcp/chat_templates/<family>.jinja (the real template), bos / eos / pad, the ids
# the generation config stops on, the special tokens and the other added tokens. "chatml" is the default tiny model's
# own template (with {% generation %} markers); "none" is a base model without a chat template (Falcon-7B's tokenizer).
CHAT_FAMILIES: dict[str, dict] = {
    "chatml": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", stop=["<|im_end|>"], special=SPECIAL_TOKENS),
    "none": dict(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", stop=["<|endoftext|>"], special=["<|endoftext|>"]),
    "llama3": dict(
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        stop=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        special=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ],
    ),
    "qwen3": dict(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        stop=["<|im_end|>", "<|endoftext|>"],
        special=SPECIAL_TOKENS,
        added=["<think>", "</think>", "<tool_call>", "</tool_call>"],
    ),
    "gemma3": dict(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        stop=["<eos>", "<end_of_turn>"],
        special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
    ),
    "mistral": dict(
        bos="<s>", eos="</s>", pad=None, stop=["</s>"], special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    ),
    "gptoss": dict(
        bos="<|startoftext|>",
        eos="<|return|>",
        pad="<|endoftext|>",
        stop=["<|return|>", "<|endoftext|>", "<|call|>"],
        special=[
            "<|startoftext|>",
            "<|endoftext|>",
            "<|return|>",
            "<|constrain|>",
            "<|channel|>",
            "<|start|>",
            "<|end|>",
            "<|message|>",
            "<|call|>",
        ],
    ),
}
# The chat family of each architecture's instruct models (Falcon-7B and the tiny DeepSeek stand for base models).
ARCHITECTURE_FAMILY = {
    "LlamaForCausalLM": "llama3",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "chatml",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3",
    "Qwen3VLMoeForConditionalGeneration": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "GptOssForCausalLM": "gptoss",
    "FalconForCausalLM": "none",
    "DeepseekV3ForCausalLM": "none",
}
# make_tiny_model arguments for Qwen2.5-0.5B's shape (its config.json); add model_vocab_size=151936 for its vocabulary
QWEN25_05B = dict(
    hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864, tie_word_embeddings=True
)

_SUBJECTS = ["the cat", "a robot", "my friend", "the teacher", "an engineer", "the model", "a bird", "the river"]
_VERBS = ["sees", "builds", "likes", "follows", "writes", "reads", "finds", "paints"]
_OBJECTS = ["a red ball", "the blue sky", "a small house", "the long road", "a green tree", "an old book"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]


def training_corpus(n_lines: int = 600, seed: int = 0) -> list[str]:
    """Deterministic English-like lines, arithmetic and chat turns to train the tokenizer on."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        kind = i % 4
        if kind == 0:
            lines.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.")
        elif kind == 1:
            lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
        elif kind == 2:
            lines.append(f"The color of item {i} is {rng.choice(_COLORS)}, not {rng.choice(_COLORS)}.")
        else:
            lines.append(f"Question: name a color. Answer: {rng.choice(_COLORS)}! Thanks, goodbye.")
    return lines


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
    pairs, sft = [], []
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
) -> Path:
    """Write a tiny random-init model (LlamaForCausalLM unless `architecture` says otherwise) and its tokenizer
    (safetensors) to `out_dir` and return it.

    `model_vocab_size` pads the embedding / LM head beyond the tokenizer's vocabulary, so a
    benchmark model pays a realistic vocabulary projection (the extra rows are never produced).
    `num_kv_heads` / `tie_word_embeddings` give real models' shapes (grouped-query attention, tied head).
    `architecture`: one of TINY_ARCHITECTURES (MoE ones get `num_experts` experts, 2 per token).
    `chat_family`: the tokenizer's chat template and special tokens, one of CHAT_FAMILIES (ARCHITECTURE_FAMILY gives
    each architecture's own).
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
    stop = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_FAMILIES[chat_family]["stop"]]
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_tokenizer(vocab_size: int, seed: int, chat_family: str):
    """A byte-level BPE trained on training_corpus with `chat_family`'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if chat_family not in CHAT_FAMILIES:
        raise ValueError(f"chat_family={chat_family!r}; allowed: {list(CHAT_FAMILIES)}")
    family = CHAT_FAMILIES[chat_family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=family["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed=seed), trainer=trainer)
    tok.add_tokens(family.get("added", []))
    if family["bos"]:  # prompts tokenized with add_special_tokens=True start with bos, as the real tokenizers do
        bos = family["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    if chat_family == "chatml":
        template = CHAT_TEMPLATE
    elif chat_family == "none":
        template = None
    else:
        template = (Path(__file__).parent / "chat_templates" / f"{chat_family}.jinja").read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family["bos"],
        eos_token=family["eos"],
        pad_token=family["pad"],
        chat_template=template,
        model_max_length=2048,
    )


# Tiny checkpoints of these architectures are built offline from their config classes (tests/test_architectures.py).
TINY_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "GptOssForCausalLM",
    "FalconForCausalLM",
    "DeepseekV3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)


def tiny_config(architecture: str, common: dict, intermediate_size: int, num_experts: int):
    """The transformers config of a tiny model of `architecture` (common: the shared shape arguments)."""
    import transformers

    moe = dict(num_experts_per_tok=2)
    dense = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "Gemma3ForCausalLM": transformers.Gemma3TextConfig,
    }
    if architecture in dense:
        return dense[architecture](intermediate_size=intermediate_size, **common)
    if architecture == "Qwen3MoeForCausalLM":
        return transformers.Qwen3MoeConfig(
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size // 2,
            num_experts=num_experts,
            **moe,
            **common,
        )
    if architecture == "MixtralForCausalLM":
        return transformers.MixtralConfig(
            intermediate_size=intermediate_size // 2, num_local_experts=num_experts, **moe, **common
        )
    if architecture == "GptOssForCausalLM":
        return transformers.GptOssConfig(
            intermediate_size=intermediate_size // 2,
            num_local_experts=num_experts,
            layer_types=["full_attention"] * common["num_hidden_layers"],
            **moe,
            **common,
        )
    if architecture == "FalconForCausalLM":  # Falcon-7B's layout: multi-query attention, parallel attention + MLP
        falcon = {
            k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads", "tie_word_embeddings")
        }
        return transformers.FalconConfig(
            ffn_hidden_size=intermediate_size,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
            **falcon,
        )
    if architecture == "DeepseekV3ForCausalLM":  # MLA attention; layer 0 dense, layer 1 MoE with a shared expert;
        # bitsandbytes' CPU 4-bit kernel needs in-features a multiple of 64 and out-features one of 32
        mla = {k: v for k, v in common.items() if k != "head_dim"}
        head = common["head_dim"]
        return transformers.DeepseekV3Config(
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size // 2,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            q_lora_rank=common["hidden_size"] // 2,
            kv_lora_rank=common["hidden_size"] // 2,
            qk_nope_head_dim=head,
            qk_rope_head_dim=head,
            v_head_dim=head,
            **moe,
            **mla,
        )
    if architecture.endswith("ForConditionalGeneration"):
        return _tiny_vlm_config(architecture, common, intermediate_size, num_experts)
    raise ValueError(f"architecture={architecture!r}; allowed: {list(TINY_ARCHITECTURES)}")


def _tiny_vlm_config(architecture: str, common: dict, intermediate_size: int, num_experts: int):
    """A vision-language model: the tiny text model plus a one-layer vision tower; image tokens at the vocabulary's end."""
    import transformers

    text = {**common, "vocab_size": common["vocab_size"] + 3, "intermediate_size": intermediate_size}
    image, boi, eoi = text["vocab_size"] - 1, text["vocab_size"] - 3, text["vocab_size"] - 2
    if architecture == "Gemma3ForConditionalGeneration":
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        return transformers.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=image,
            boi_token_index=boi,
            eoi_token_index=eoi,
            eos_token_id=common["eos_token_id"],
            pad_token_id=common["pad_token_id"],
        )
    if architecture == "Qwen3VLMoeForConditionalGeneration":
        half = common["head_dim"] // 2
        text.update(
            moe_intermediate_size=intermediate_size // 2,
            num_experts=num_experts,
            num_experts_per_tok=2,
            rope_scaling={"rope_type": "default", "mrope_section": [half // 2, half // 4, half // 4]},
        )
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=common["hidden_size"],
            patch_size=8,
            temporal_patch_size=2,
            spatial_merge_size=2,
            deepstack_visual_indexes=[0],
        )
        return transformers.Qwen3VLMoeConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=image,
            vision_start_token_id=boi,
            vision_end_token_id=eoi,
            eos_token_id=common["eos_token_id"],
            pad_token_id=common["pad_token_id"],
        )
    raise ValueError(f"architecture={architecture!r}; allowed: {list(TINY_ARCHITECTURES)}")
