"""Dataset validation: formats per row, bad rows with line numbers, streaming, every file kind."""

from __future__ import annotations

import csv
import json

import pytest

from llm_mcp.core.data import DataError, load_rows, validate_dataset

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
PC = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "plain text"}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_formats_are_detected_per_row(tmp_path):
    summary = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [CHAT, PC, TEXT, PC]))
    assert summary.rows == 4 and summary.formats == {"messages": 1, "prompt_completion": 2, "text": 1}
    assert summary.complete and summary.kind == "jsonl"


def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    rows = [
        PC,
        "{not json",
        {"completion": "x"},
        {"foo": 1},
        "",
        CHAT,
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"text": ""},
        {"prompt": "a", "completion": "b"},
        [1, 2],
    ]
    with pytest.raises(DataError) as err:
        validate_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    problems = err.value.problems
    assert "7 bad row(s)" in problems[0] and "first 5 shown, 2 more" in problems[0]  # blank lines are skipped
    assert problems[1].startswith("dataset line 2: invalid JSON")
    assert problems[2] == "dataset line 3: missing 'prompt' (prompt_completion rows need both)"
    assert "line 4" in problems[3] and "found keys ['foo']" in problems[3]
    assert "line 7" in problems[4] and "'robot'" in problems[4] and "allowed" in problems[4]
    assert "line 8" in problems[5] and "no assistant message" in problems[5]


def test_empty_binary_and_unknown_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no rows"):
        validate_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        validate_dataset(tmp_path / "bin.jsonl")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"extension '\.txt'; allowed"):
        validate_dataset(tmp_path / "data.txt")
    with pytest.raises(DataError, match="does not exist"):
        validate_dataset(tmp_path / "missing.jsonl")


def test_large_files_are_streamed_within_a_time_budget(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps(PC) + "\n"
    with open(path, "w") as fh:
        for _ in range(400_000):
            fh.write(line)
    summary = validate_dataset(path, time_budget_s=0.05)
    assert not summary.complete and 0 < summary.rows < 400_000


def test_json_csv_parquet_and_datasets_dir(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([PC, TEXT]))
    assert validate_dataset(tmp_path / "d.json").rows == 2
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["messages"])
        w.writeheader()
        w.writerow({"messages": json.dumps(CHAT["messages"])})
    assert validate_dataset(tmp_path / "d.csv").formats == {"messages": 1}
    assert load_rows(tmp_path / "d.csv")[0]["messages"][2]["content"] == "Hello!"

    import datasets

    ds = datasets.Dataset.from_list([PC, PC, PC])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert validate_dataset(tmp_path / "d.parquet").rows == 3
    ds.save_to_disk(str(tmp_path / "saved"))
    assert validate_dataset(tmp_path / "saved").rows == 3
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        validate_dataset(tmp_path)
