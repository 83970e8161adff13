"""Loss masks: only assistant / completion tokens carry labels, with or without template markers."""

from __future__ import annotations

import pytest

from llm_mcp.train.encode import IGNORE, encode_rows

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Goodbye."}]}


@pytest.fixture(scope="module")
def tok(tiny_model_template):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_template)


def trained_text(tok, example) -> str:
    return tok.decode([t for t in example["labels"] if t != IGNORE])


@pytest.mark.parametrize("markers", [True, False])
def test_only_assistant_turns_carry_labels(tok, markers):
    if not markers:  # a template without {% generation %}: spans are found by prefix rendering
        tok = type(tok).from_pretrained(tok.name_or_path)
        tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (example,), stats = encode_rows(tok, [CHAT], max_seq_len=512, train_on="completion")
    assert trained_text(tok, example) == "Hello!<|im_end|>Goodbye.<|im_end|>"
    assert stats.target_tokens == sum(1 for t in example["labels"][1:] if t != IGNORE)


def test_prompt_completion_text_and_train_on_all(tok):
    rows = [{"prompt": "Q: 2+2?", "completion": " 4"}, {"text": "plain words"}]
    (pc, text), _ = encode_rows(tok, rows, max_seq_len=512, train_on="completion")
    assert trained_text(tok, pc) == " 4<|im_end|>"
    assert trained_text(tok, text) == "plain words<|im_end|>"
    (pc_all, _), _ = encode_rows(tok, rows, max_seq_len=512, train_on="all")
    assert trained_text(tok, pc_all) == "Q: 2+2? 4<|im_end|>"


def test_truncation_is_counted_and_empty_rows_dropped(tok):
    rows = [{"prompt": "word " * 50, "completion": " yes"}, {"text": "a b c d e f g h i j k l m n o p"}]
    examples, stats = encode_rows(tok, rows, max_seq_len=8, train_on="completion")
    assert stats.truncated == 2 and stats.dropped_empty == 1 and len(examples) == 1
    assert all(len(e["input_ids"]) <= 8 for e in examples)
