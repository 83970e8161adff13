"""start_finetune validation through the MCP tool: every problem at once, nothing started on error."""

from __future__ import annotations

import pytest
from mcp import Client

pytestmark = pytest.mark.anyio


async def call(server, **args):
    async with Client(server) as client:
        return await client.call_tool("start_finetune", args)


def no_jobs(state) -> bool:
    return state.store.list() == [] and not any(state.store.jobs_dir.iterdir())


async def test_every_problem_is_reported_together_and_no_job_is_made(app, home, tiny_model):
    state, server = app
    bad = home / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"oops": 1}\n')
    result = await call(
        server,
        model="models/tiny",
        method="lora",
        dataset=str(bad),
        learning_rate=5.0,
        lora_rank=0,
        batch_size=100000,
        max_steps=10,
        epochs=2,
        target_modules=["q_proj", "wq"],
    )
    assert result.is_error
    text = result.content[0].text
    for fragment in [
        "learning_rate=5.0 is out of range",
        "lora_rank=0 is out of range",
        "batch_size=100000",
        "give max_steps or epochs, not both",
        "'wq'",
        "allowed: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj'",
        "dataset line 2: no known format",
        "found keys ['oops']",
    ]:
        assert fragment in text, (fragment, text)
    assert no_jobs(state)


async def test_unknown_model_suggests_and_unsupported_method_names_alternatives(app, dataset):
    _, server = app
    result = await call(server, model="Qwen/Qwen3-7B", method="lora", dataset=str(dataset))
    assert result.is_error and "Did you mean" in result.content[0].text and "Qwen/Qwen3-8B" in result.content[0].text
    result = await call(server, model="Qwen/Qwen3-VL-30B-A3B-Instruct", method="sparse", dataset=str(dataset))
    text = result.content[0].text
    assert "method='sparse' is unsupported for Qwen/Qwen3-VL-30B-A3B-Instruct" in text
    assert "Methods you can use for this model: ['lora', 'qlora', 'dora']" in text


async def test_memory_that_does_not_fit_suggests_what_would(app, dataset):
    _, server = app
    result = await call(server, model="meta-llama/Llama-3.1-70B", method="lora", dataset=str(dataset))
    assert result.is_error
    text = result.content[0].text
    assert "exceeds the" in text and "usable on" in text
    assert "would fit" in text or "list_models(fits=true)" in text


async def test_dataset_outside_allowed_roots_is_refused(app, tiny_model, tmp_path):
    _, server = app
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"text": "x"}\n')
    result = await call(server, model="models/tiny", method="lora", dataset=str(outside))
    assert result.is_error and "outside the allowed roots" in result.content[0].text


async def test_dry_run_returns_config_and_estimates_and_starts_nothing(app, tiny_model, dataset):
    state, server = app
    result = await call(
        server, model="models/tiny", method="dora", dataset="data/train.jsonl", max_steps=7, batch_size=2, dry_run=True
    )
    assert not result.is_error, result.content[0].text
    data = result.structured_content
    assert data["dry_run"] and data.get("job_id") is None and data["state"] == "dry_run"
    cfg, est = data["config"], data["estimates"]
    assert cfg["lora"]["use_dora"] is True and cfg["lora"]["rank"] == 32 and cfg["max_steps"] == 7
    from llm_mcp.core.local_models import resolve_model

    assert cfg["learning_rate"] == resolve_model(state.matrix, state.settings, "models/tiny").recommended_lr
    assert est["total_steps"] == 7 and est["trainable_params"] > 0 and est["memory_gb"] > 0
    assert est["train_rows"] == 64 and est["dataset_formats"] == {"messages": 32, "prompt_completion": 16, "text": 16}
    assert no_jobs(state)


async def test_experimental_method_is_allowed_with_a_warning(app, tmp_path, dataset, home):
    # A local Mixtral-architecture checkpoint: its QLoRA status is experimental in `architectures`.
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    MixtralForCausalLM(cfg).save_pretrained(home / "models" / "moe")
    _, server = app
    result = await call(server, model="models/moe", method="qlora", dataset=str(dataset), dry_run=True)
    assert not result.is_error, result.content[0].text
    assert any("experimental" in w for w in result.structured_content["warnings"])


async def test_resume_from_unknown_or_unfinished_job(app):
    _, server = app
    result = await call(server, model="models/tiny", method="lora", dataset="data/train.jsonl", resume_from="ft-nope")
    assert result.is_error and "job_id='ft-nope' does not exist" in result.content[0].text


async def test_resume_must_go_past_the_checkpoint(app, tiny_model, dataset):
    import time

    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.core.store import Job

    state, server = app
    ok = await call(server, model="models/tiny", method="lora", dataset=str(dataset), max_steps=50, dry_run=True)
    config = JobConfig.parse({**ok.structured_content["config"], "job_id": "ft-old"})
    state.store.insert(
        Job(
            id="ft-old",
            name="old",
            state="cancelled",
            model="tiny",
            method="lora",
            device_set="cpu",
            created_at=time.time(),
            config=config,
        )
    )
    (state.store.job_dir("ft-old") / "checkpoints" / "step-000030").mkdir(parents=True)
    same = dict(model="models/tiny", method="lora", dataset=str(dataset))
    result = await call(server, **same, resume_from="ft-old", max_steps=20)
    assert result.is_error and "not past the checkpoint at step 30" in result.content[0].text
    result = await call(server, **same, resume_from="ft-old", learning_rate=0.5)
    assert result.is_error and "learning_rate=0.5 differs from the resumed job's" in result.content[0].text
    result = await call(server, **same, resume_from="ft-old", dry_run=True)
    assert not result.is_error, result.content[0].text
    assert result.structured_content["estimates"]["total_steps"] == 50
    assert result.structured_content["config"]["resume_checkpoint"].endswith("step-000030")


async def test_cluster_options_on_the_local_executor_are_refused_with_the_way_to_use_them(app, tiny_model, dataset):
    state, server = app
    base = dict(model="models/tiny", method="lora", dataset="data/train.jsonl", max_steps=2)
    nodes = await call(server, **base, nodes=2)
    assert nodes.is_error and "nodes=2" in nodes.content[0].text and "--executor slurm" in nodes.content[0].text
    sched = await call(server, **base, scheduler={"partition": "gpu"})
    assert sched.is_error and "executor='local'" in sched.content[0].text
    assert no_jobs(state)


def running_cluster_job(home, job_id: str):
    """A Slurm job recorded as running (its processes are what each test writes into its directory)."""
    import time

    from llm_mcp.core.jobconfig import parse_config
    from llm_mcp.core.store import Job, JobStore
    from tests.test_jobconfig import V0

    store = JobStore(home)
    job = Job(
        id=job_id,
        name=job_id,
        state="running",
        model="m",
        method="lora",
        device_set="cpu",
        created_at=time.time(),
        config=parse_config(dict(V0), "test"),
        engine="slurm",
    )
    store.insert(job)
    return store, job


def test_a_trainer_stopped_by_a_signal_nobody_sent_fails_with_a_resume_step(home):
    """A TERM from outside (a time limit, an administrator) checkpoints and stops, but it is no cancel."""
    from llm_mcp.core.jobdir import write_result
    from llm_mcp.jobs.outcome import finalize

    store, job = running_cluster_job(home, "ft-x")
    (store.job_dir("ft-x") / "checkpoints" / "step-000004").mkdir(parents=True)
    write_result(store.job_dir("ft-x"), {"state": "cancelled", "step": 4})
    assert finalize(store, job, 0) == "failed"
    done = store.get("ft-x")
    assert "cancel_job did not send" in done.error and "step 4" in done.error
    assert done.next_step == "resume_from='ft-x' continues from the last checkpoint"


RESUME = "resume_from='ft-r' continues from the last checkpoint"
ECHO = {"ended": "failed", "error": "RuntimeError: [gloo] Connection closed by peer", "next_step": "read the log"}


@pytest.mark.parametrize(
    "ranks, error, next_step",
    [
        # rank 1 killed without a word: rank 0's "connection closed" is only its echo
        ([ECHO, {}], "rank 1 on node b ended without a word during step 24 (killed: kill -9 or the out-of-memory "
         "killer, or the node was lost); the last checkpoint is step 20", RESUME),
        # rank 1 failed on its own: its error and its advice, not rank 0's echo
        ([ECHO, {"ended": "failed", "error": "OutOfMemoryError: CUDA out of memory", "next_step": "lower batch_size"}],
         "rank 1 on node b failed: OutOfMemoryError: CUDA out of memory", "lower batch_size"),
        # rank 0 failed on its own (rank 1 then stopped by the launcher): its result.json already says so
        ([{"ended": "failed", "error": "ValueError: bad row", "next_step": "fix row 3"}, {}], "ValueError: bad row",
         "fix row 3"),
        # everything stopped at once (scancel, ray job stop): no rank is blamed, the exit status speaks
        ([{}, {}], "the training process exited with code 1", RESUME),
    ],
)  # fmt: skip
def test_a_multi_process_job_fails_with_the_rank_and_node_that_caused_it(home, ranks, error, next_step):
    from llm_mcp.core.jobdir import append_metric, write_rank, write_result
    from llm_mcp.jobs.outcome import finalize

    store, job = running_cluster_job(home, "ft-r")
    job_dir = store.job_dir("ft-r")
    (job_dir / "checkpoints" / "step-000020").mkdir(parents=True)
    for step in range(1, 24):
        append_metric(job_dir, {"step": step, "loss": 1.0})
    for rank, (node, end) in enumerate(zip("ab", ranks)):
        write_rank(job_dir, rank, {"rank": rank, "world_size": 2, "node": node, "node_rank": rank, **end})
    if ranks[0]:  # rank 0 writes the job's result
        write_result(job_dir, {"state": "failed", "error": ranks[0]["error"], "next_step": ranks[0]["next_step"]})
    assert finalize(store, job, 1) == "failed"
    done = store.get("ft-r")
    assert (done.error, done.next_step) == (error, next_step)
