"""Tiny tokenizers built offline: a byte-level BPE trained on a generated corpus, with a chat family's special
tokens and chat template (llm_mcp/chat_templates/<family>.jinja, or a ChatML template with {% generation %}
markers that let training mask everything but assistant tokens)."""

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
        template = (Path(__file__).parent.parent / "chat_templates" / f"{chat_family}.jinja").read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family["bos"],
        eos_token=family["eos"],
        pad_token=family["pad"],
        chat_template=template,
        model_max_length=2048,
    )
