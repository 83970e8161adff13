"""The memory plan against what autograd really keeps: activations counted with saved-tensor hooks at real layer
widths (llm_mcp.bench.activations), and the plans that follow from them."""

from __future__ import annotations

import pytest

from llm_mcp.core.estimates import estimate_memory, layer_activation_bytes
from llm_mcp.core.fit import CHECKPOINTING_MARGIN, plan_memory
from llm_mcp.core.hardware import Hardware
from llm_mcp.modeling.activations import ALL_LINEAR, SHAPES, count_layer

JOB_TOKENS = 4 * 1024  # start_finetune's defaults: batch 4 x 1024 tokens

# (shape, method, dropout): every method at Llama-3.1-8B's widths, and Qwen3-8B's (q/k norms, a narrower MLP) for
# the frozen block, LoRA and DoRA. About 5 minutes on 2 cores, most of it DoRA's and the sparse deltas' set-up.
CASES = [
    ("llama-3.1-8b", None, 0.0),
    ("llama-3.1-8b", "lora", 0.0),
    ("llama-3.1-8b", "lora", 0.05),
    ("llama-3.1-8b", "dora", 0.0),
    ("llama-3.1-8b", "sparse", 0.0),
    ("qwen3-8b", None, 0.0),
    ("qwen3-8b", "lora", 0.05),
    ("qwen3-8b", "dora", 0.0),
]


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "method", "dropout"), CASES)
def test_the_activation_estimate_is_within_15_percent_of_the_saved_tensor_count(shape, method, dropout):
    _, dims = SHAPES[shape]
    counted = count_layer(shape, method, dropout, checkpointing=False)
    est = layer_activation_bytes(dims, method, ALL_LINEAR, 32, dropout, elem=2)
    at_job = lambda x: x.per_token * JOB_TOKENS + x.fixed  # noqa: E731
    assert at_job(est) == pytest.approx(at_job(counted), rel=0.15), (counted, est)


@pytest.mark.slow
def test_with_checkpointing_a_layer_keeps_only_its_input():
    _, dims = SHAPES["llama-3.1-8b"]
    counted = count_layer("llama-3.1-8b", "lora", 0.05, checkpointing=True)
    assert counted.per_token == pytest.approx(dims.hidden_size * 2, rel=0.15) and counted.fixed < 2**20


def test_llama_3_1_8b_lora_at_the_defaults_on_an_80_gb_gpu_keeps_checkpointing_on(matrix, defaults):
    """Its activations without checkpointing are ~66 GB (32 layers x 4096 tokens x ~110 h bytes, plus the logits):
    the old 34 h per layer planned 40 GB in all and switched checkpointing off."""
    entry = matrix.get("meta-llama/Llama-3.1-8B-Instruct")
    kw = dict(target_modules=entry.target_modules, rank=32, batch_size=4, seq_len=1024, dropout=0.05)
    off = estimate_memory(entry.dims, entry.params_b, "lora", gradient_checkpointing=False, **kw)
    assert off.activations_gb > 55
    plan = plan_memory(entry, "lora", Hardware.hypothetical(80), **kw)
    assert plan.fits and plan.gradient_checkpointing


def test_checkpointing_stays_on_when_the_plan_without_it_would_fill_the_margin(matrix):
    entry = matrix.get("meta-llama/Llama-3.2-1B")
    kw = dict(target_modules=entry.target_modules, rank=32, batch_size=1, seq_len=1024, dropout=0.05)
    off = estimate_memory(entry.dims, entry.params_b, "lora", gradient_checkpointing=False, **kw).total_gb
    snug = Hardware.hypothetical(off / 0.95 / (1 - CHECKPOINTING_MARGIN / 2))  # fits, inside the margin
    roomy = Hardware.hypothetical(off / 0.95 / (1 - 2 * CHECKPOINTING_MARGIN))
    assert off <= snug.usable_gb() and plan_memory(entry, "lora", snug, **kw).gradient_checkpointing
    assert not plan_memory(entry, "lora", roomy, **kw).gradient_checkpointing
    assert not plan_memory(entry, "lora", snug, gradient_checkpointing=False, **kw).gradient_checkpointing


def test_dora_dropout_costs_weight_copies_and_the_job_is_warned(app, home, tiny_model, dataset):
    """DoRA defaults to dropout 0 (configs/dora.yaml); a job that sets it is told what it costs."""
    from mcp import Client

    _, dims = SHAPES["llama-3.1-8b"]
    plain = layer_activation_bytes(dims, "dora", ALL_LINEAR, 32, 0.0, elem=2)
    dropped = layer_activation_bytes(dims, "dora", ALL_LINEAR, 32, 0.05, elem=2)
    assert plain.fixed == 0 and dropped.fixed > 1.4 * 2**30  # ~1.5 GiB of fp32 weight copies per 8B layer
    import anyio

    async def dry(**extra):
        _, server = app
        async with Client(server) as client:
            args = dict(model="models/tiny", method="dora", dataset="data/train.jsonl", dry_run=True, **extra)
            return (await client.call_tool("start_finetune", args)).structured_content

    default = anyio.run(dry)
    assert default["config"]["lora"]["dropout"] == 0.0
    assert not any("with DoRA" in w for w in default["warnings"])
    warned = anyio.run(lambda: dry(lora_dropout=0.1))
    assert any("lora_dropout=0.1 with DoRA" in w and "fp32" in w for w in warned["warnings"]), warned["warnings"]


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_dry_runs_time_is_within_2x_of_the_jobs_wall_time_here(app, home, tiny_model, dataset):
    """Before any job has finished here the defaults give the estimate; afterwards this machine's own jobs do."""
    from mcp import Client

    from tests.conftest import wait_final

    _, server = app
    shapes = [dict(max_steps=30, batch_size=4, max_seq_len=128), dict(max_steps=60, batch_size=2, max_seq_len=64)]
    bases = []
    async with Client(server) as client:
        for shape in shapes:
            args = dict(model="models/tiny", method="lora", dataset="data/train.jsonl", checkpoint_every=0, **shape)
            dry = (await client.call_tool("start_finetune", {**args, "dry_run": True})).structured_content
            estimate, bases = dry["estimates"]["rough_time_s"], [*bases, dry["estimates"]["time_basis"]]
            job = (await client.call_tool("start_finetune", args)).structured_content
            final = await wait_final(client, job["job_id"])
            wall = final["finished_at"] - final["created_at"]
            assert final["state"] == "succeeded" and wall / 2 <= estimate <= 2 * wall, (shape, estimate, wall, bases)
    assert bases[0].startswith("defaults for cpu") and bases[1].startswith("measured: 1 earlier job"), bases
    assert (home / "throughput.json").exists()
