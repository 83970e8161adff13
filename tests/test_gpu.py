"""GPU suite: `pytest -m gpu` on a CUDA machine (skipped without CUDA, see conftest.py).

Every method on a model shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864,
151,936-token tied vocabulary; random init from that config, trained in bf16), through the MCP tools as a
client calls them; then export (PEFT adapter and merged) and reload, the measured peak against the
estimate, the sparse layer on CUDA, and fp16 loss scaling. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from mcp import Client

from llm_mcp.core.jobdir import read_metrics
from llm_mcp.core.settings import Settings, data_path
from tests.conftest import trained_home

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.anyio]
METHODS = ("lora", "qlora", "dora", "sparse")
TRAIN = dict(
    model="models/tiny",
    dataset="data/train.jsonl",
    max_steps=40,
    learning_rate=2e-3,
    lora_dropout=0.0,
    batch_size=4,
    max_seq_len=128,
    checkpoint_every=20,
)


@pytest.fixture(scope="module")
def qwen_shaped(tmp_path_factory):
    from llm_mcp.tiny import QWEN25_05B, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("qwen") / "qwen2.5-0.5b-shaped", **QWEN25_05B, model_vocab_size=151936
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, qwen_shaped):
    return trained_home(tmp_path_factory.mktemp("gpu"), qwen_shaped, TRAIN, METHODS)


@pytest.fixture
def server(trained):
    from llm_mcp.server import AppState, build_server

    state = AppState.load(Settings(home=trained[0], models_path=data_path("models.yaml"), sampler="transformers"))
    yield state, build_server(state)
    state.shutdown()


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_trains_in_bf16_on_cuda_within_its_estimate(trained, server, method):
    from llm_mcp.core.estimates import estimate_memory
    from llm_mcp.core.local_models import resolve_model

    _, ids = trained
    state, _ = server
    metrics = read_metrics(state.store.job_dir(ids[method]))
    start = next(m for m in metrics if m.get("event") == "start")
    end = next(m for m in metrics if m.get("event") == "end")
    assert start["device"] == "cuda"
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # from ~ln(151936) = 11.9
    entry = resolve_model(state.matrix, state.settings, "models/tiny")
    cfg = state.store.get(ids[method]).config
    est = estimate_memory(
        entry.dims,
        entry.params_b,
        method,
        target_modules=entry.target_modules,
        batch_size=4,
        seq_len=128,
        device="cuda",
        gradient_checkpointing=cfg.gradient_checkpointing,
        quantized=cfg.quantized,
        rigl_fraction=cfg.sparse.mask_update_fraction if cfg.sparse else 0.0,
    )
    measured_gb = end["peak_memory_mb"] / 1024
    assert measured_gb <= est.total_gb, (measured_gb, est)  # the estimate may be generous, never short
    print(f"{method}: measured peak {measured_gb:.2f} GB, estimate {est.total_gb:.2f} GB")


@pytest.mark.parametrize("method", METHODS)
async def test_export_and_reload_on_cuda(trained, server, method):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, ids = trained
    state, srv = server
    async with Client(srv) as client:
        merged = await client.call_tool("export_adapter", {"job_id": ids[method], "format": "merged"})
        assert not merged.is_error and merged.structured_content["state"] == "done", merged.content[0].text
        if method != "sparse":
            adapter = await client.call_tool("export_adapter", {"job_id": ids[method]})
            assert not adapter.is_error, adapter.content[0].text
        sampled = await client.call_tool("sample", {"job_id": ids[method], "prompt": "The cat", "max_tokens": 4})
        assert not sampled.is_error, sampled.content[0].text
    model = (
        AutoModelForCausalLM.from_pretrained(merged.structured_content["destination"], dtype=torch.bfloat16)
        .to("cuda")
        .eval()
    )
    probe = load_file(str(state.store.job_dir(ids[method]) / "probe.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None].to("cuda")).logits[0].float().cpu()
    # bf16 weights: a merged model reproduces the trained one to bf16 precision (QLoRA: over the de-quantized base)
    scale = probe["logits"].abs().max().item()
    assert (logits - probe["logits"]).abs().max().item() <= (0.15 if method == "qlora" else 0.05) * scale


def test_sparse_layer_follows_the_module_to_cuda():
    from torch import nn

    from llm_mcp.modeling.sparse import SparseDeltaLinear

    layer = SparseDeltaLinear(nn.Linear(64, 32), 100, torch.Generator().manual_seed(0)).to("cuda")
    assert layer.crow.is_cuda and layer.cols.is_cuda and layer.indices.is_cuda
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    layer.collect_candidates(10)
    layer(x).square().sum().backward()
    assert layer.values.grad.is_cuda and layer.cand_idx.numel() == 20
    assert layer.update_mask(10) == 10 and layer.crow.is_cuda


def test_fp16_training_scales_the_loss():
    """GPUs without bf16 train in fp16: accelerate's GradScaler must be on, so small gradients survive."""
    from accelerate import Accelerator

    from llm_mcp.modeling.base import mixed_precision

    acc = Accelerator(mixed_precision=mixed_precision("cuda", bf16=False))
    assert acc.scaler is not None
    model = torch.nn.Linear(16, 16).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    loss = model(torch.randn(8, 16, device="cuda")).float().square().mean() * 1e-8  # underflows in plain fp16
    acc.backward(loss)
    acc.unscale_gradients()
    grad = next(model.parameters()).grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_bf16_is_chosen_only_where_the_gpu_computes_it_natively():
    """T4 / V100 (compute capability < 8) emulate bf16: they must train in fp16 with loss scaling."""
    from llm_mcp.modeling.base import compute_dtype, native_bf16

    native = torch.cuda.get_device_capability()[0] >= 8
    assert native_bf16() is native
    assert compute_dtype("cuda") is (torch.bfloat16 if native else torch.float16)


@pytest.mark.parametrize("eval_fraction", [0.0, 0.1])  # 0: the default; the probe then follows a backward
def test_a_job_under_fsdp_trains_checkpoints_and_saves_a_loadable_adapter(tmp_path, qwen_shaped, eval_fraction):
    """configs/accelerate/fsdp.yaml on one GPU (FSDP over one process), or two-way on two: the sharded paths of
    the trainer (gathered adapter, per-rank optimizer shards, collective eval and probe) run; CPU cannot run FSDP."""
    import json
    import shutil
    import subprocess

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.jobs.local import accelerate_command
    from tests.conftest import LEARNABLE_ROWS

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(LEARNABLE_ROWS[i % 4]) for i in range(64)) + "\n")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    cfg = JobConfig.parse(
        {
            "version": 1,
            "job_id": "fsdp-test",
            "model": {"id": "qwen", "path": str(qwen_shaped)},
            "method": "lora",
            "dataset": str(data),
            "eval_fraction": eval_fraction,
            "max_steps": 6,
            "learning_rate": 2e-3,
            "batch_size": 4,
            "gradient_accumulation": 1,
            "max_seq_len": 64,
            "checkpoint_every": 3,
            "keep_checkpoints": 2,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "device": "cuda",
            "distributed": "fsdp",
            "num_processes": min(2, torch.cuda.device_count()),  # two-way sharding where two GPUs exist
            "lora": {"rank": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    cfg.write(job_dir)
    cmd = accelerate_command(cfg, job_dir)
    assert "fsdp.yaml" in " ".join(cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=job_dir)
    result = json.loads((job_dir / "result.json").read_text())
    assert result["state"] == "succeeded", (result, proc.stdout[-3000:], proc.stderr[-3000:])
    assert (job_dir / "checkpoints" / "step-000003" / "optimizer_0.pt").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_shaped), job_dir / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # B starts at 0
    shutil.rmtree(job_dir / "checkpoints")
