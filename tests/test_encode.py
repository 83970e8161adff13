"""Loss masks: only assistant / completion tokens carry labels, with or without template markers."""

from __future__ import annotations

import pytest

from llm_mcp.modeling.encode import IGNORE, encode_rows

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
}


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


# Each family's assistant turns, as the loss mask must cover them (CHAT above): the header stays out, the token that
# closes the turn is in; Qwen3's last turn carries the empty think block its template writes; Mistral's answer
# starts with the space after [/INST]; gpt-oss's turns are final-channel messages, the last one ending <|return|>.
FAMILY_TURNS = {
    "none": ["Hello!<|endoftext|>", "Goodbye.<|endoftext|>"],
    "llama3": ["Hello!<|eot_id|>", "Goodbye.<|eot_id|>"],
    "qwen3": ["Hello!<|im_end|>", "<think>\n\n</think>\n\nGoodbye.<|im_end|>"],
    "gemma3": ["Hello!<end_of_turn>", "Goodbye.<end_of_turn>"],
    "mistral": [" Hello!</s>", " Goodbye.</s>"],
    "gptoss": ["<|channel|>final<|message|>Hello!<|end|>", "<|channel|>final<|message|>Goodbye.<|return|>"],
}


def family_tokenizer(family: str):
    from llm_mcp.modeling.encode import DEFAULT_CHAT_TEMPLATE
    from llm_mcp.tiny import tiny_tokenizer

    tok = tiny_tokenizer(512, 0, family)
    tok.chat_template = tok.chat_template or DEFAULT_CHAT_TEMPLATE  # as tokenizer_for does
    return tok


def label_runs(example) -> list[list[int]]:
    """The labelled tokens, as runs of consecutive positions."""
    runs, last = [], None
    for i, t in enumerate(example["labels"]):
        if t == IGNORE:
            continue
        if last != i - 1:
            runs.append([])
        runs[-1].append(t)
        last = i
    return runs


@pytest.mark.parametrize("family", list(FAMILY_TURNS))
def test_every_assistant_turn_of_each_family_is_masked_token_by_token(family):
    tok = family_tokenizer(family)
    chat = CHAT
    if family == "qwen3":  # its template drops an earlier turn's <think> block: the mask follows what is rendered
        chat = {
            "messages": [
                *CHAT["messages"][:2],
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
                *CHAT["messages"][3:],
            ]
        }
    (example,), _ = encode_rows(tok, [chat], max_seq_len=512, train_on="completion")
    assert (
        example["input_ids"] == tok.apply_chat_template(chat["messages"], tokenize=True, return_dict=True)["input_ids"]
    )
    runs = label_runs(example)
    assert [tok.decode(run) for run in runs] == FAMILY_TURNS[family]  # one contiguous run per turn, exactly its tokens
    assert "hmm" not in tok.decode(example["input_ids"]) or family != "qwen3"


def test_offsets_agree_with_generation_markers(tok):
    """The default tiny template has {% generation %} markers: the offset-based mask without them is identical."""
    plain = type(tok).from_pretrained(tok.name_or_path)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (marked,), _ = encode_rows(tok, [CHAT], max_seq_len=512, train_on="completion")
    (found,), _ = encode_rows(plain, [CHAT], max_seq_len=512, train_on="completion")
    assert marked == found


@pytest.mark.parametrize("family", ["llama3", "gemma3", "mistral", "gptoss"])
def test_preference_answers_end_with_the_turns_end_token(family):
    from llm_mcp.modeling.encode import encode_pair

    tok = family_tokenizer(family)
    pair = {
        "prompt": [{"role": "user", "content": "Is snow white?"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    prompt, chosen, rejected = encode_pair(tok, pair)
    end = FAMILY_TURNS[family][1].split("Goodbye.")[1]
    assert tok.decode(chosen).endswith("Yes." + end) and tok.decode(rejected).endswith("No." + end)
    assert tok.decode(prompt + chosen) == tok.apply_chat_template(
        pair["prompt"] + pair["chosen"], tokenize=False
    ).rstrip("\n")


def test_generation_stops_on_every_end_of_turn_id_the_model_lists(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    from llm_mcp.modeling.encode import end_of_turn_ids
    from llm_mcp.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2, chat_family="llama3")
    tok = AutoTokenizer.from_pretrained(path)
    model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    ids = end_of_turn_ids(tok, model)
    assert [tok.convert_ids_to_tokens(i) for i in ids] == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|eot_id|>")]  # no model: the tokenizer's eos


MIXTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)  # Mixtral-8x7B-Instruct-v0.1: no header, [INST] as plain text


@pytest.mark.parametrize(
    "family,messages,turns",
    [
        (
            "llama3",
            [{"role": "user", "content": "Pick a or b"}, {"role": "assistant", "content": "a"}],
            ["a<|eot_id|>"],
        ),
        (
            "llama3",
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Sure! "},
                {"role": "user", "content": "Sure! Now go"},
                {"role": "assistant", "content": "Ok."},
            ],
            ["Sure!<|eot_id|>", "Ok.<|eot_id|>"],
        ),
        (
            "mistral",
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Ok. Hi."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Be brief."},
            ],
            [" Ok. Hi.</s>", " Be brief.</s>"],
        ),
        (
            "qwen3",
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>r</think>Hello!\n"}],
            ["<think>\nr\n</think>\n\nHello!\n<|im_end|>"],
        ),
        (
            "mixtral_v01",
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ],
            ["Hello!<|eot_id|>", "Goodbye.<|eot_id|>"],
        ),
    ],
)
def test_a_turn_is_found_after_its_header_never_in_other_text(family, messages, turns):
    """Short answers that also occur in the template's own text, in a user turn or in a dropped system message."""
    tok = family_tokenizer("llama3" if family == "mixtral_v01" else family)
    if family == "mixtral_v01":
        tok.chat_template = MIXTRAL_V01
    (example,), _ = encode_rows(tok, [{"messages": messages}], max_seq_len=512, train_on="completion")
    assert [tok.decode(run) for run in label_runs(example)] == turns


def test_a_base_model_whose_turns_close_with_another_token_stops_on_it():
    """Qwen3-Base: eos <|endoftext|>, but its template closes each turn with <|im_end|>."""
    from llm_mcp.modeling.encode import end_of_turn_ids

    tok = family_tokenizer("qwen3")
    tok.eos_token = "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tok)


# Tool use and reasoning, per family: the tool call is trained as the template writes it (through the token that
# closes it), the tool's result never; the reasoning as the family renders it (Qwen3's reasoning_content, gpt-oss'
# analysis channel, a <think> block elsewhere), left out of the loss with train_reasoning=False.
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
            ],
        },
        {"role": "tool", "content": "18C sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."},
    ],
}
TOOL_TURNS = {
    "llama3": [
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|eot_id|>',
        "It is 18C and sunny.<|eot_id|>",
    ],
    "qwen3": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is 18C and sunny.<|im_end|>",
    ],
    "mistral": [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}, "id": "c00010000"}]</s>',
        " It is 18C and sunny.</s>",
    ],
    "gptoss": [
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "days": 2}<|call|>',
        "<|channel|>final<|message|>It is 18C and sunny.<|return|>",
    ],
}
REASONING_ROW = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Two plus two is four.", "content": "4"},
    ]
}
REASONING_TURN = {  # (trained with the reasoning, trained without it)
    "llama3": ("<think>\nTwo plus two is four.\n</think>\n\n4<|eot_id|>", ["<think>\n", "\n</think>\n\n4<|eot_id|>"]),
    "qwen3": ("<think>\nTwo plus two is four.\n</think>\n\n4<|im_end|>", ["<think>\n", "\n</think>\n\n4<|im_end|>"]),
    "gemma3": (
        "<think>\nTwo plus two is four.\n</think>\n\n4<end_of_turn>",
        ["<think>\n", "\n</think>\n\n4<end_of_turn>"],
    ),
    "gptoss": (
        "<|channel|>analysis<|message|>Two plus two is four."
        "<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
        ["<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"],
    ),
}


@pytest.mark.parametrize("family", list(TOOL_TURNS))
def test_tool_calls_are_trained_and_tool_results_never(family):
    from llm_mcp.core.data import normalize

    tok = family_tokenizer(family)
    (example,), _ = encode_rows(tok, [normalize(TOOL_ROW)], max_seq_len=1024, train_on="completion")
    assert [tok.decode(run) for run in label_runs(example)] == TOOL_TURNS[family]
    assert "18C sunny" in tok.decode(example["input_ids"])  # the result is in the context, outside the loss
    first = next(i for i, t in enumerate(example["labels"]) if t != IGNORE)
    assert "get_weather" in tok.decode(example["input_ids"][:first])  # the tools list is rendered in the prompt


@pytest.mark.parametrize("family", ["gemma3", "none"])
def test_a_template_without_tool_support_refuses_tool_rows_with_the_reason(family):
    from llm_mcp.core.data import normalize

    with pytest.raises(ValueError, match="cannot render them \\(it has no tool support\\)"):
        encode_rows(family_tokenizer(family), [normalize(TOOL_ROW)], max_seq_len=1024, train_on="completion")


@pytest.mark.parametrize("family", list(REASONING_TURN))
def test_reasoning_is_rendered_by_the_family_and_trained_only_when_asked(family):
    tok = family_tokenizer(family)
    with_it, without = REASONING_TURN[family]
    (trained,), _ = encode_rows(tok, [REASONING_ROW], max_seq_len=1024, train_on="completion")
    assert [tok.decode(run) for run in label_runs(trained)] == [with_it]
    (left_out,), _ = encode_rows(tok, [REASONING_ROW], 1024, "completion", train_reasoning=False)
    assert [tok.decode(run) for run in label_runs(left_out)] == without
    assert left_out["input_ids"] == trained["input_ids"]  # the same text; only the loss differs
