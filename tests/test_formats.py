"""The shapes people's data comes in, read row by row into the conversations training sees."""

from __future__ import annotations

import json

import pytest

from llm_mcp.core.data import DataError, parse_row, validate_dataset

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_alpaca_with_system_and_history_is_a_conversation():
    fmt, row = parse_row(
        {
            "instruction": "Translate",
            "input": "chat",
            "output": "cat",
            "system": "Be exact.",
            "history": [["Translate dog", "chien"]],
        }
    )
    assert fmt == "alpaca"
    assert row == {
        "messages": [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "Translate dog"},
            {"role": "assistant", "content": "chien"},
            {"role": "user", "content": "Translate\nchat"},
            {"role": "assistant", "content": "cat"},
        ]
    }
    assert parse_row({"instruction": "Say hi", "input": "", "output": "hi"})[1]["messages"][0]["content"] == "Say hi"
    with pytest.raises(ValueError, match=r"history\[0\] must be a \[question, answer\] pair"):
        parse_row({"instruction": "a", "output": "b", "history": [["only one"]]})
    with pytest.raises(ValueError, match="'output' is empty"):
        parse_row({"instruction": "a", "output": "  "})


def test_sharegpt_roles_and_function_calls_become_tool_turns():
    fmt, row = parse_row(
        {
            "system": "You route.",
            "tools": json.dumps(TOOLS),
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                {"from": "observation", "value": "18C"},
                {"from": "gpt", "value": "18C in Paris."},
            ],
        }
    )
    assert fmt == "sharegpt" and row["tools"] == TOOLS
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert row["messages"][2]["tool_calls"] == [CALL] and row["messages"][3]["content"] == "18C"
    with pytest.raises(ValueError, match=r"conversations\[0\].from=.bot.; allowed"):
        parse_row({"conversations": [{"from": "bot", "value": "x"}]})


def test_openai_tool_calls_content_parts_and_reasoning_are_normalized():
    fmt, row = parse_row(
        {
            "tools": TOOLS,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "assistant", "thinking": "It said 18C.", "content": "18C."},
            ],
        }
    )
    assert fmt == "messages" and row["messages"][0]["content"] == "Weather in Paris?"
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "call_1"}]}
    assert row["messages"][2]["tool_call_id"] == "call_1"
    assert row["messages"][3] == {"role": "assistant", "content": "18C.", "reasoning_content": "It said 18C."}
    _, think = parse_row(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
            ]
        }
    )
    assert think["messages"][1] == {"role": "assistant", "content": "4", "reasoning_content": "add"}
    for bad, why in [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            "training on images is not supported",
        ),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not JSON"),
        ([{"role": "assistant", "content": "   "}], "empty assistant message"),
        ([{"role": "robot", "content": "x"}], "allowed:"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_row({"messages": bad})


def test_unknown_shapes_get_a_mapping_hint_and_never_a_wrong_near_name():
    with pytest.raises(ValueError) as err:
        parse_row({"ticket": "My invoice is wrong", "expected": "billing"})
    assert "columns={'prompt': 'ticket', 'completion': 'expected'}" in str(err.value)
    assert "rejected" not in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'mesages' for 'messages'"):
        parse_row({"mesages": []})


def test_a_column_mapping_reads_any_shape_and_a_row_it_does_not_fit_is_reported_by_line(tmp_path):
    path = tmp_path / "tickets.jsonl"
    rows = [{"ticket": "a", "expected": "b"}, {"ticket": "c"}, {"ticket": "d", "expected": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        validate_dataset(path, columns={"prompt": "ticket", "completion": "expected"})
    assert any("line 2: no 'expected' (for 'completion') in this row" in p for p in err.value.problems)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
    summary = validate_dataset(path, columns={"prompt": "ticket", "completion": "expected"})
    assert summary.rows == 2 and summary.formats == {"prompt_completion": 2}
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    assert validate_dataset(chat, columns={"messages": "dialog"}).formats == {"messages": 1}
