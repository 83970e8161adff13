"""datasets / save_dataset, what a dry run says about the data, and the first-hour fixes (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mcp import Client

from tests.conftest import LEARNABLE_ROWS

pytestmark = pytest.mark.anyio


async def call(server, tool, **args):
    async with Client(server) as client:
        return await client.call_tool(tool, args)


async def test_save_dataset_writes_validated_rows_and_never_overwrites_by_accident(app, home):
    _, server = app
    rows = LEARNABLE_ROWS * 2
    first = await call(server, "save_dataset", name="chats", rows=rows)
    assert not first.is_error, first.content[0].text
    saved = first.structured_content
    assert saved["path"] == "data/chats.jsonl" and saved["total_rows"] == 8
    assert [json.loads(line) for line in (home / "data" / "chats.jsonl").read_text().splitlines()] == rows
    again = await call(server, "save_dataset", name="chats", rows=rows)
    assert again.is_error and "not overwritten" in again.content[0].text and "mode='append'" in again.content[0].text
    more = await call(server, "save_dataset", name="chats.jsonl", rows=rows[:3], mode="APPEND")
    assert not more.is_error and more.structured_content["total_rows"] == 11
    bad = await call(
        server,
        "save_dataset",
        name="chats",
        mode="append",
        rows=[
            rows[0],
            {"promt": "hi", "completion": "x"},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
        ],
    )
    text = bad.content[0].text
    assert bad.is_error and "2 of 3 rows are bad; nothing was written" in text
    assert "rows[1]: missing 'prompt' (found 'promt')" in text and "rows[2]: messages[1] is an empty assistant" in text
    assert len((home / "data" / "chats.jsonl").read_text().splitlines()) == 11
    replaced = await call(server, "save_dataset", name="chats", rows=rows[:2], mode="overwrite")
    assert not replaced.is_error and replaced.structured_content["total_rows"] == 2


async def test_save_dataset_refuses_bad_names_symlinks_and_unbounded_input(app, home):
    _, server = app
    for name in ("../jobs", "a/b", ".hidden", "x" * 80):
        r = await call(server, "save_dataset", name=name, rows=LEARNABLE_ROWS)
        assert r.is_error and "name=" in r.content[0].text, name
    (home / "data").mkdir(exist_ok=True)
    os.symlink(home / "jobs.db", home / "data" / "db.jsonl")
    r = await call(server, "save_dataset", name="db", rows=LEARNABLE_ROWS, mode="append")
    assert r.is_error and "symlink" in r.content[0].text
    r = await call(server, "save_dataset", name="big", rows=[{"text": "x"}] * 10_001)
    assert r.is_error and "at most 10000 per call" in r.content[0].text
    assert not (home / "data" / "big.jsonl").exists()


async def test_datasets_lists_and_inspects_with_token_counts(app, home, tiny_model):
    _, server = app
    long_row = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    unanswered = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"},
        ]
    }
    r = await call(server, "save_dataset", name="mixed", rows=LEARNABLE_ROWS * 4 + [long_row, unanswered])
    assert any("end on a user or system turn" in w for w in r.structured_content["warnings"])
    listed = await call(server, "datasets")
    assert [d["path"] for d in listed.structured_content["datasets"]] == ["data/mixed.jsonl"]
    r = await call(server, "datasets", path="data/mixed.jsonl", model="models/tiny", max_seq_len=64)
    info = r.structured_content
    assert not r.is_error and info["usable"] and info["rows"] == 18
    assert info["formats"] == {"messages": 10, "prompt_completion": 4, "text": 4}
    tokens = info["tokens"]
    assert (
        tokens["truncated"] == 1 and tokens["dropped"] == 1 and tokens["longest"] > 64
    )  # the long row: answer cut off
    assert sum(tokens["histogram"].values()) == 18
    assert any("truncated" in w and "row 17" in w.replace("rows [17]", "row 17") for w in info["warnings"])
    assert "[[The sky is blue." in info["preview"] and "What color is the sky?" in info["preview"]
    assert "What color is the sky?]]" not in info["preview"]  # the user turn is context, not trained


async def test_datasets_reports_bad_rows_instead_of_failing(app, home):
    _, server = app
    (home / "data").mkdir()
    (home / "data" / "bad.jsonl").write_text('{"text": "ok"}\n{"mesages": []}\nnot json\n')
    r = await call(server, "datasets", path="data/bad.jsonl")
    info = r.structured_content
    assert not r.is_error and info["usable"] is False
    assert any("line 2" in p and "did you mean 'mesages' for 'messages'" in p for p in info["problems"])
    assert any("line 3" in p and "invalid JSON" in p for p in info["problems"])


async def test_dry_run_reports_truncation_suspicious_rows_and_eval_rows(app, home, tiny_model):
    _, server = app
    long_row = {"prompt": "word " * 300, "completion": " done"}
    await call(server, "save_dataset", name="train", rows=LEARNABLE_ROWS * 4 + [long_row])
    await call(server, "save_dataset", name="held", rows=LEARNABLE_ROWS * 5)
    r = await call(
        server,
        "start_finetune",
        model="models/tiny",
        method="lora",
        dataset="data/train.jsonl",
        eval_dataset="data/held.jsonl",
        max_seq_len=64,
        dry_run=True,
    )
    assert not r.is_error, r.content[0].text
    out = r.structured_content
    assert out["estimates"]["eval_rows"] == 20 and "(20 eval)" in r.content[0].text
    assert out["estimates"]["tokens"]["truncated"] == 1 and out["estimates"]["tokens"]["dropped"] == 1
    assert any("will be dropped" in w for w in out["warnings"]), out["warnings"]
    assert out["estimates"]["model_source"].startswith("local directory")


async def test_a_hub_model_that_cannot_be_fetched_is_refused_by_the_dry_run(app, dataset, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # deterministic with or without a network
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _, server = app
    r = await call(
        server,
        "start_finetune",
        model="meta-llama/Llama-3.2-1B",
        method="qlora",
        dataset=str(dataset),
        max_seq_len=256,
        batch_size=1,
        dry_run=True,
    )
    text = r.content[0].text
    assert r.is_error and "cannot be loaded here" in text and "not in the local cache" in text
    assert "hf download meta-llama/Llama-3.2-1B" in text and "LLM_MCP_HOME" in text  # huggingface_hub 2: `hf`


async def test_argument_errors_read_like_every_other_error(app):
    _, server = app
    r = await call(server, "job_status", wait_seconds=1e9)
    text = r.content[0].text
    assert r.is_error and "wait_seconds=1000000000.0" in text and "from 0 to 30" in text
    assert "Fix the argument and call job_status again" in text and "errors.pydantic.dev" not in text
    r = await call(server, "list_models", method="QLoRA", type="Instruct")  # enums are case-insensitive
    assert not r.is_error and r.structured_content["filters"] == {"method": "qlora", "type": "instruct"}
    r = await call(server, "start_finetune", method="lora")
    assert r.is_error and "model is required" in r.content[0].text and "dataset is required" in r.content[0].text


def test_a_relative_home_works_for_jobs(tmp_path, tiny_model_template):
    """LLM_MCP_HOME=.demo (as docs/operations.md suggests): the job's supervisor must not resolve it in the job dir."""
    import shutil

    shutil.copytree(tiny_model_template, tmp_path / "rel" / "models" / "tiny")
    code = """
import anyio, json, sys
from mcp import Client, StdioServerParameters
async def main():
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp", "serve"],
                                   env={**__import__("os").environ, "LLM_MCP_HOME": "rel",
                                        "LLM_MCP_SAMPLER": "transformers"},
                                   cwd=".")
    async with Client(params) as c:
        await c.call_tool("save_dataset", {"name": "d", "rows": [{"text": "a b c d"}] * 8})
        r = await c.call_tool("start_finetune", {"model": "models/tiny", "method": "lora", "dataset": "data/d.jsonl",
                                                 "max_steps": 2, "max_seq_len": 32})
        job = r.structured_content["job_id"]
        while True:
            s = (await c.call_tool("job_status", {"job_id": job, "wait_seconds": 30})).structured_content["job"]
            if s["state"] in ("succeeded", "failed", "cancelled"):
                print(json.dumps(s)); return
anyio.run(main)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MCP_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status["state"] == "succeeded", status
    assert status["job_dir"].startswith(str(tmp_path / "rel"))
    assert not list((tmp_path / "rel" / "jobs").glob("*/rel")), "a stray home inside the job directory"


def test_suspicious_rows_are_counted_with_their_lines(tmp_path):
    from llm_mcp.core.data import validate_dataset

    path = tmp_path / "d.jsonl"
    rows = [
        {"text": "ok"},
        {"text": "x" * 200_000},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "?"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    warnings = validate_dataset(path).warnings
    assert any("1 row(s) are over 100,000 characters" in w and "line 2" in w for w in warnings), warnings
    assert any("1 row(s) end on a user or system turn" in w and "line 3" in w for w in warnings), warnings


def test_job_status_lists_what_the_trainer_truncated_and_dropped(app, tiny_model, dataset):
    """job_status reads the trainer's start record (metrics.jsonl) and says what was cut."""
    import time

    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.core.store import Job
    from llm_mcp.jobs.status import build_status

    state, _ = app
    config = JobConfig.parse(
        {
            "job_id": "ft-x",
            "model": {"id": "tiny", "path": str(tiny_model)},
            "method": "lora",
            "dataset": str(dataset),
            "learning_rate": 1e-3,
            "batch_size": 1,
            "gradient_accumulation": 1,
            "max_seq_len": 64,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "lora": {"rank": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]},
        }
    )
    state.store.insert(
        Job(
            id="ft-x",
            name="x",
            state="succeeded",
            model="tiny",
            method="lora",
            device_set="cpu",
            created_at=time.time(),
            config=config,
            warnings=["from the dry run"],
        )
    )
    job_dir = state.store.job_dir("ft-x")
    job_dir.mkdir(parents=True)
    (job_dir / "metrics.jsonl").write_text(
        json.dumps({"event": "start", "total_steps": 5, "examples": 60, "truncated": 3, "dropped": 4}) + "\n"
    )
    warnings = build_status(state.store, state.store.get("ft-x")).warnings
    assert warnings[0] == "from the dry run"
    assert "truncated 3 of 64 training sequences" in warnings[1] and "dropped 4" in warnings[1]


async def test_a_path_outside_the_roots_points_an_agent_at_save_dataset(app, home, tiny_model):
    _, server = app
    r = await call(server, "start_finetune", model="models/tiny", method="lora", dataset="/etc/hostname")
    text = r.content[0].text
    assert r.is_error and "outside the allowed roots" in text
    assert "save_dataset" in text and str(home / "data") in text
    assert "system directory" in text and "--allow-root" not in text  # /etc is never offered
