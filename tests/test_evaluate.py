"""evaluate: scoring functions, the argument contract, and an evaluation job's lifecycle (cancel, refusals)."""

from __future__ import annotations

import json

import anyio
import pytest
from mcp import Client

from llm_mcp.inference.evaluate import reference_of, score_generation, summarize
from tests.conftest import wait_final

pytestmark = pytest.mark.anyio


def test_references_and_scores():
    assert reference_of({"prompt": "Q:", "completion": " 4"}) == ({"prompt": "Q:"}, " 4")
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert reference_of({"messages": msgs}) == ({"messages": msgs[:3]}, "d")
    assert reference_of({"text": "t"}) is None
    assert score_generation("  The  answer is 4 ", "the answer is 4", r"\d") == {
        "exact_match": True,
        "contains": True,
        "regex": True,
    }
    assert score_generation("I think the answer is 4.", "the answer is 4", r"^\d+$") == {
        "exact_match": False,
        "contains": True,
        "regex": False,
    }
    rows = [
        {"target": "base", "loss": 2.0, "tokens": 1, "exact_match": False, "contains": True},
        {"target": "base", "loss": 1.0, "tokens": 3},
        {"target": "base", "preferred": True, "margin": 2.0},
        {"target": "base", "preferred": False, "margin": -1.0},
        {"target": "other", "loss": 9.0, "tokens": 1},
    ]
    s = summarize(rows, "base")
    assert s["rows"] == 4 and s["loss"] == pytest.approx(1.25) and s["loss_tokens"] == 4
    assert (s["exact_match"], s["contains"], s["exact_match_rows"]) == (0.0, 1.0, 1)
    assert (s["preference_accuracy"], s["preference_margin"], s["preference_rows"]) == (0.5, 0.5, 2)


def test_the_scores_chart_is_a_png():
    from llm_mcp.jobs.plot import evaluation_png

    png = evaluation_png(
        {
            "targets": [
                {"target": "base", "loss": 2.0, "exact_match": 0.1},
                {"target": "ft-1", "loss": 1.0, "exact_match": 0.7, "preference_accuracy": 0.9},
            ]
        },
        "title",
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


async def test_every_problem_is_reported_together(app, tiny_model):
    _, server = app
    async with Client(server) as client:
        r = await client.call_tool(
            "evaluate", {"targets": ["base", "ft-nope"], "dataset": "data/missing.jsonl", "regex": "("}
        )
        only_base = await client.call_tool("evaluate", {"targets": ["base"], "dataset": "data/missing.jsonl"})
        too_many = await client.call_tool("evaluate", {"targets": ["base"] * 9, "dataset": "x", "model": "models/tiny"})
    text = r.content[0].text
    assert r.is_error and "3 problems" in text
    assert "targets: 'ft-nope'" in text and "does not exist" in text and "regex='('" in text
    assert "model is required when targets has no job" in only_base.content[0].text
    assert too_many.is_error and "targets" in too_many.content[0].text


@pytest.mark.slow
async def test_an_evaluation_is_a_job_it_cancels_and_refuses_what_it_has_no_adapter_for(app, tiny_model):
    state, server = app
    rows = [{"prompt": f"Q{i}: name a color.", "completion": " red"} for i in range(400)]
    path = state.settings.home / "data" / "eval.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    async with Client(server) as client:
        started = await client.call_tool(
            "evaluate",
            {
                "targets": ["base"],
                "model": "models/tiny",
                "dataset": "data/eval.jsonl",
                "max_rows": 400,
                "max_tokens": 32,
                "wait_seconds": 0,
            },
        )
        job_id = started.structured_content["job_id"]
        assert started.structured_content["state"] in ("queued", "running")
        assert f"job_status(job_id='{job_id}'" in started.content[0].text
        while (
            not (state.store.job_dir(job_id) / "eval_rows.jsonl").exists()
            or not (state.store.job_dir(job_id) / "eval_rows.jsonl").read_text()
        ):
            await anyio.sleep(0.2)
        await client.call_tool("cancel_job", {"job_id": job_id})
        job = await wait_final(client, job_id, timeout=120)
        sample = await client.call_tool("sample", {"job_id": job_id, "prompt": "hi"})
        resume = await client.call_tool(
            "start_finetune",
            {"model": "models/tiny", "method": "lora", "dataset": "data/eval.jsonl", "resume_from": job_id},
        )
    assert job["state"] == "cancelled" and job["objective"] == "evaluate", job
    scored = job["evaluation"]["targets"][0]
    assert 0 < scored["rows"] < 400 and job["evaluation"]["complete"] is False
    assert scored["exact_match_rows"] == scored["rows"]
    lines = (state.store.job_dir(job_id) / "eval_rows.jsonl").read_text().splitlines()
    assert len(lines) == scored["rows"] and json.loads(lines[0])["target"] == "base"
    assert sample.is_error and "is an evaluation and has no adapter" in sample.content[0].text
    assert resume.is_error and "is an evaluation, not a training job" in resume.content[0].text
