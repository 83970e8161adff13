"""Sparse fine-tuning: RigL mask updates on known gradients, real jobs, export and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mcp import Client
from safetensors.torch import load_file
from torch import nn

from llm_mcp.core.jobdir import read_metrics
from llm_mcp.modeling.sparse import SparseDeltaLinear, cosine_fraction, load_sparse_state, merge_candidates
from tests.conftest import wait_final

pytestmark = pytest.mark.anyio
ARGS = dict(
    model="models/tiny", method="sparse", dataset="data/train.jsonl", learning_rate=5e-3, max_seq_len=64, batch_size=4
)


def small_layer(k: int = 10) -> SparseDeltaLinear:
    torch.manual_seed(0)
    return SparseDeltaLinear(nn.Linear(8, 6), k, torch.Generator().manual_seed(1))


def test_forward_and_gradients_match_a_dense_delta():
    layer = small_layer()
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.k))
    x = torch.randn(3, 4, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    delta = torch.zeros(48)
    delta[layer.indices] = layer.values.detach()
    delta = delta.view(6, 8).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, layer.base.weight + delta, layer.base.bias).pow(2).sum().backward()
    torch.testing.assert_close(layer.values.grad, delta.grad.view(-1)[layer.indices])
    torch.testing.assert_close(x.grad, x2.grad)


def test_mask_update_drops_smallest_and_regrows_largest_gradients():
    layer = small_layer(k=10)
    values = torch.tensor([0.5, -0.01, 2.0, 0.02, -3.0, 0.3, -0.005, 1.0, 0.7, -0.9])
    with torch.no_grad():
        layer.values.copy_(values)
    old_idx = layer.indices.clone()
    opt = torch.optim.Adam([layer.values], lr=0.1)
    layer.values.grad = torch.ones(10)
    opt.step()  # creates Adam state
    opt.state[layer.values]["exp_avg"].copy_(torch.arange(10.0) + 1)
    with torch.no_grad():
        layer.values.copy_(values)
    grad = torch.zeros(48)
    inactive = [i for i in range(48) if i not in set(old_idx.tolist())]
    for rank, flat in enumerate(inactive[:5]):
        grad[flat] = 10.0 + rank  # the 3 largest: inactive[4], inactive[3], inactive[2]
    grad[old_idx[4]] = 100.0  # active entries are never "regrown", however large their gradient
    layer.collect_candidates(3)
    layer.observe_gradient(grad.view(6, 8).neg().clone())  # |gradient| counts, not its sign

    changed = layer.update_mask(3, opt)

    assert changed == 3 and layer.k == 10 and layer.last_changed == 3
    dropped = {old_idx[i].item() for i in (1, 3, 6)}  # |values| 0.01, 0.02, 0.005
    grown = {inactive[2], inactive[3], inactive[4]}
    new = set(layer.indices.tolist())
    assert new == (set(old_idx.tolist()) - dropped) | grown
    assert layer.indices.tolist() == sorted(new)
    by_index = dict(zip(layer.indices.tolist(), layer.values.tolist()))
    exp_avg = dict(zip(layer.indices.tolist(), opt.state[layer.values]["exp_avg"].tolist()))
    for pos, flat in enumerate(old_idx.tolist()):
        if flat not in dropped:
            assert by_index[flat] == pytest.approx(values[pos].item())
            assert exp_avg[flat] == pos + 1
    assert all(by_index[f] == 0 and exp_avg[f] == 0 for f in grown)
    assert layer.crow[-1] == 10 and layer.cand_idx is None and layer.grow_budget == 0


def test_csr_pattern_moves_with_the_module():
    """crow / cols are (non-persistent) buffers: .to(device / dtype) and accelerate's prepare move them."""
    layer = small_layer()
    assert {"indices", "crow", "cols"} <= set(layer._buffers)
    assert set(layer.state_dict()) == {"values", "indices", "base.weight", "base.bias"}  # the pattern is derived
    layer.to("meta")
    assert layer.crow.device.type == layer.cols.device.type == layer.values.device.type == "meta"
    other = small_layer().to(torch.float64)
    assert other.crow.dtype == torch.int64 and other.crow.device == other.values.device
    other.set_delta(torch.tensor([47, 0, 9]), torch.tensor([1.0, 2.0, 3.0]))
    assert other.crow.tolist() == [0, 1, 2, 2, 2, 2, 3] and other.cols.tolist() == [0, 1, 7]


def test_rigl_regrows_at_the_largest_summed_gradient_and_keeps_only_candidates():
    """Two micro-batches through the real backward: only O(k) candidate tensors are kept per layer, no dense
    gradient survives the backward, and the regrown entries are the inactive ones with the largest |sum|."""
    layer = small_layer(k=10)
    torch.manual_seed(3)
    x, target = torch.randn(2, 5, 8), torch.randn(2, 5, 6)
    exact = torch.zeros(6, 8)
    layer.collect_candidates(3)
    for scale in (1.0, 0.5):  # the second micro-batch: the same rows at half weight
        out = layer(x * scale)
        (out * target).sum().backward()
        exact += target.reshape(-1, 6).t() @ (x * scale).reshape(-1, 8)
        held = [t for t in list(vars(layer).values()) + list(layer._buffers.values()) if isinstance(t, torch.Tensor)]
        assert max(t.numel() for t in held) <= max(layer.k, 2 * 3, 6 + 1)  # never out x in
    assert layer.cand_idx.numel() == 2 * 3 and not hasattr(layer, "dense_grad")
    torch.testing.assert_close(layer.cand_val, exact.view(-1)[layer.cand_idx])  # exact sums at kept entries
    old = set(layer.indices.tolist())
    score = exact.abs().view(-1).clone()
    score[list(old)] = -1
    expected = set(torch.topk(score, 3).indices.tolist())
    with torch.no_grad():
        layer.values.copy_(torch.arange(1.0, 11.0))  # drops the three smallest: positions 0, 1, 2
    dropped = set(layer.indices[:3].tolist())
    assert layer.update_mask(3) == 3
    assert set(layer.indices.tolist()) == (old - dropped) | expected
    assert layer.cand_idx is None and layer.cand_val is None


def test_candidate_sets_of_several_processes_are_summed_per_index():
    idx, val = merge_candidates(torch.tensor([5, 9, 2, 9, 7, 5]), torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5, 1.0]))
    assert idx.tolist() == [2, 5, 7, 9] and val.tolist() == [3.0, 2.0, 0.5, -6.0]


def test_cosine_decay_of_the_update_fraction():
    assert cosine_fraction(0.3, 0, 100) == pytest.approx(0.3)
    assert cosine_fraction(0.3, 50, 100) == pytest.approx(0.15)
    assert cosine_fraction(0.3, 100, 100) == pytest.approx(0.0)


async def test_sparse_job_changes_only_masked_entries_and_learns(app, tiny_model, dataset):
    state, server = app
    async with Client(server) as client:
        lora = await client.call_tool("start_finetune", {**ARGS, "method": "lora", "max_steps": 40, "dry_run": True})
        r = await client.call_tool(
            "start_finetune",
            {**ARGS, "max_steps": 40, "mask_update_interval": 10, "mask_update_fraction": 0.3, "checkpoint_every": 0},
        )
        assert not r.is_error, r.content[0].text
        assert (
            r.structured_content["estimates"]["trainable_params"]
            == lora.structured_content["estimates"]["trainable_params"]
        )  # density 'auto' = LoRA rank 32's parameter count
        job_id = r.structured_content["job_id"]
        while True:
            s = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 30})
            if s.structured_content["job"]["state"] != "running":
                break
        assert s.structured_content["job"]["state"] == "succeeded", s.content[0].text
        assert s.structured_content["job"]["mask_update"]["step"] == 30 and "sparse density" in s.content[0].text
        merged = await client.call_tool("export_adapter", {"job_id": job_id, "format": "merged"})
        exported = await client.call_tool("export_adapter", {"job_id": job_id})
        sampled = await client.call_tool(
            "sample", {"job_id": job_id, "prompt": "The cat", "max_tokens": 5, "compare_base": True}
        )
        plain = await client.call_tool("sample", {"model": "models/tiny", "prompt": "The cat", "max_tokens": 5})
    job_dir = state.store.job_dir(job_id)
    steps = [m for m in read_metrics(job_dir) if "loss" in m]
    assert sum(m["loss"] for m in steps[-5:]) / 5 < sum(m["loss"] for m in steps[:5]) / 5 - 1.0
    delta = load_sparse_state(job_dir / "adapter")
    k_total = sum(len(i) for i, _ in delta.values())
    expected = {
        step: sum(round(cosine_fraction(0.3, step, 40) * len(i)) for i, _ in delta.values()) for step in (10, 20, 30)
    }
    assert {m["step"]: m["mask_changed"] for m in steps if m["mask_changed"]} == expected
    assert all(m["density"] == steps[0]["density"] for m in steps)

    base = load_file(str(tiny_model / "model.safetensors"))
    merged_weights = load_file(str(f"{merged.structured_content['destination']}/model.safetensors"))
    touched = 0
    for name, tensor in base.items():
        diff = (merged_weights[name] - tensor).reshape(-1)
        module = name.removesuffix(".weight")
        if module in delta:
            outside = torch.ones_like(diff, dtype=torch.bool)
            outside[delta[module][0]] = False
            assert diff[outside].abs().max() == 0, name  # only masked entries of the base ever change
            touched += int((diff != 0).sum())
        else:
            assert diff.abs().max() == 0, name
    assert 0 < touched <= k_total

    from transformers import AutoModelForCausalLM

    probe = load_file(str(job_dir / "probe.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(merged.structured_content["destination"]).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0]
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-4)

    dest = exported.structured_content["destination"]
    config = json.loads(Path(f"{dest}/sparse_config.json").read_text())
    assert config["format"] == "llm_mcp.sparse" and config["base_model_name_or_path"] == str(tiny_model)
    assert (
        "cannot" in exported.structured_content["snippets"]["vllm"]
        or "not LoRA" in exported.structured_content["snippets"]["vllm"]
    )
    assert sampled.structured_content["base_completions"] == plain.structured_content["completions"]


@pytest.mark.parametrize(
    "args,fragment",
    [
        ({"sparsity_type": "block"}, "sparsity_type='block'; allowed: ['unstructured']"),
        ({"density": 0.1, "sparsity_ratio": 0.9}, "give density or sparsity_ratio"),
        ({"method": "lora", "use_rigl": False}, "only apply to method='sparse'"),
        ({"density": 1.5}, "density=1.5 is out of range"),
    ],
)
async def test_sparse_argument_errors(app, tiny_model, dataset, args, fragment):
    _, server = app
    async with Client(server) as client:
        result = await client.call_tool("start_finetune", {**ARGS, "max_steps": 5, **args})
    assert result.is_error and fragment in result.content[0].text, result.content[0].text


async def test_sparsity_ratio_is_the_fraction_not_trained(app, tiny_model, dataset):
    _, server = app
    async with Client(server) as client:
        result = await client.call_tool(
            "start_finetune", {**ARGS, "max_steps": 5, "sparsity_ratio": 0.9, "dry_run": True}
        )
    assert result.structured_content["config"]["sparse"]["density"] == pytest.approx(0.1)


@pytest.mark.slow
async def test_resume_with_mask_updates_reproduces_the_run_over_a_4bit_base(app, tiny_model, dataset):
    state, server = app
    args = {**ARGS, "max_steps": 120, "mask_update_interval": 10, "checkpoint_every": 0, "quantize_base": True}
    async with Client(server) as client:

        async def finish(job_id):
            while True:
                s = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 30})
                if s.structured_content["job"]["state"] not in ("queued", "running"):
                    return s.structured_content["job"]

        full = (await client.call_tool("start_finetune", args)).structured_content
        assert full["config"]["quantization"] is not None
        assert (await finish(full["job_id"]))["state"] == "succeeded"
        cut = (await client.call_tool("start_finetune", args)).structured_content["job_id"]
        while not [m for m in read_metrics(state.store.job_dir(cut)) if m.get("step", 0) >= 25]:
            import anyio

            await anyio.sleep(0.05)
        await client.call_tool("cancel_job", {"job_id": cut})
        stopped = (await finish(cut))["checkpoints"][-1]["step"]
        resumed_start = (await client.call_tool("start_finetune", {**args, "resume_from": cut})).structured_content
        assert resumed_start["config"]["sparse"] == full["config"]["sparse"]  # mask schedule and 4-bit base kept
        resumed = resumed_start["job_id"]
        assert (await finish(resumed))["state"] == "succeeded"
    a = {m["step"]: m for m in read_metrics(state.store.job_dir(full["job_id"])) if "loss" in m}
    c = {m["step"]: m for m in read_metrics(state.store.job_dir(resumed)) if "loss" in m}
    assert 25 <= stopped < 120 and sorted(c) == list(range(stopped + 1, 121))
    for step in c:
        assert c[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4, abs=1e-5), step
        assert c[step]["mask_changed"] == a[step]["mask_changed"]
    assert math.isfinite(c[120]["loss"])


@pytest.mark.slow
async def test_mask_updates_under_two_process_data_parallel(app, tiny_model, dataset):
    """DDP over gloo: each process's regrowth candidates are gathered (accelerate.gather) and summed per index."""
    state, server = app
    async with Client(server) as client:
        r = await client.call_tool(
            "start_finetune",
            {**ARGS, "max_steps": 4, "mask_update_interval": 2, "num_processes": 2, "checkpoint_every": 0},
        )
        assert not r.is_error, r.content[0].text
        job = await wait_final(client, r.structured_content["job_id"], timeout=300)
    assert job["state"] == "succeeded", job
    steps = [m for m in read_metrics(state.store.job_dir(job["job_id"])) if "loss" in m]
    assert steps[1]["mask_changed"] > 0 and all(m["density"] == steps[0]["density"] for m in steps)
