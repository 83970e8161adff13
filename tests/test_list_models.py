"""list_models logic: filters, memory estimates and hardware fit."""

from __future__ import annotations

import pytest

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.estimates import GPU_CLASSES_GB, estimate_memory
from llm_mcp.core.hardware import Hardware, detect
from llm_mcp.core.listing import describe_model, list_models, summarize
from llm_mcp.core.methods import METHODS


def test_whole_matrix_without_filters(matrix, defaults):
    result = list_models(matrix, detect(), defaults)
    assert result.count == result.total_in_matrix == len(matrix.models) >= 45
    assert result.hardware.source == "detected"


def test_method_filter_drops_unsupported(matrix, defaults):
    ids = {m.id for m in list_models(matrix, detect(), defaults, method="sparse").models}
    assert "deepseek-ai/DeepSeek-V3.1" not in ids  # sparse: unsupported (scale)
    assert "mistralai/Mixtral-8x7B-v0.1" in ids  # attention-only sparse on an MoE: experimental
    assert "meta-llama/Llama-2-7b-hf" in ids


def test_type_and_family_filters(matrix, defaults):
    vision = list_models(matrix, detect(), defaults, type="vision").models
    assert vision and all(m.type == "vision" for m in vision)
    gemma = list_models(matrix, detect(), defaults, family="GEMMA3").models
    assert {m.family for m in gemma} == {"gemma3"} and len(gemma) == 6


def test_unknown_family_names_the_allowed_ones(matrix, defaults):
    with pytest.raises(InvalidArgumentError) as err:
        list_models(matrix, detect(), defaults, family="gpt5")
    assert "'gpt5'" in str(err.value) and "'qwen3'" in str(err.value) and "Omit family" in str(err.value)


def test_a_gpu_of_the_listed_minimum_fits_and_the_next_smaller_does_not(matrix, defaults):
    """The matrix minimum is defined at batch 1 x 2048 tokens (the seed's convention)."""
    for entry in matrix.models:
        for method in METHODS:
            support = entry.methods[method]
            if support.status == "unsupported" or support.min_gpu_memory_gb > 80:
                continue
            est = estimate_memory(
                entry.dims,
                entry.params_b,
                method,
                target_modules=entry.target_modules,
                batch_size=1,
                seq_len=2048,
                device="cuda",
                dropout=defaults[method].lora.dropout,
            ).total_gb
            assert est <= Hardware.hypothetical(support.min_gpu_memory_gb).usable_gb(), (entry.id, method)
            smaller = [c for c in GPU_CLASSES_GB if c < support.min_gpu_memory_gb]
            if smaller:
                assert est > Hardware.hypothetical(smaller[-1]).usable_gb(), (entry.id, method, smaller[-1])


@pytest.mark.parametrize("gpu_gb", [16, 24, 40, 80])
def test_fits_in_list_models_is_what_start_finetune_accepts_at_its_defaults(matrix, defaults, gpu_gb, tmp_path):
    """list_models(fits=true) and start_finetune's memory check use the same estimate at the same defaults."""
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.core.store import JobStore
    from llm_mcp.validation.finetune import ValidationContext, resolve_finetune
    from llm_mcp.validation.requests import FinetuneRequest

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    settings = Settings(home=tmp_path, models_path=data_path("models.yaml"))
    hw = Hardware.hypothetical(gpu_gb)
    checked = 0
    for entry in matrix.models[:20]:
        fits = describe_model(entry, hw, defaults).fits_methods
        for method in ("lora", "qlora"):
            if entry.methods[method].status == "unsupported":
                continue
            with pytest.raises(InvalidArgumentError) as err:  # no hub here: refused either way, for memory or access
                resolve_finetune(
                    FinetuneRequest.parse(
                        {"model": entry.id, "method": method, "dataset": str(data)}, "start_finetune"
                    ),
                    ValidationContext(
                        matrix=matrix, settings=settings, defaults=defaults, hardware=hw, store=JobStore(tmp_path)
                    ),
                )
            refused_for_memory = "estimated memory" in str(err.value)
            assert refused_for_memory is (method not in fits), (entry.id, method, str(err.value)[:200])
            checked += 1
    assert checked > 20


def test_multi_gpu_fits_per_device_and_only_fsdp_counts_the_sum(matrix, defaults):
    """DDP keeps a whole replica per GPU: 8 x 24 GB is not 192 GB for Llama-2-70B LoRA. FSDP shards it."""
    entry = matrix.get("meta-llama/Llama-2-70b-hf")
    one = describe_model(entry, Hardware.hypothetical(24), defaults)
    eight = describe_model(entry, Hardware.hypothetical(24, num_gpus=8), defaults)
    lora = next(m for m in eight.methods if m.method == "lora")
    assert "lora" not in one.fits_methods
    # 138 GB of bf16 weights over 8 GPUs is ~17 GB each + two gathered layers + activations: more than 22.8 GB
    assert not lora.fits and lora.estimated_memory_gb > Hardware.hypothetical(24).usable_gb()
    big = describe_model(matrix.get("meta-llama/Llama-3.1-70B"), Hardware.hypothetical(80, num_gpus=4), defaults)
    lora = next(m for m in big.methods if m.method == "lora")
    assert lora.fits and lora.distributed == "fsdp" and lora.processes == 4
    assert lora.estimated_memory_gb <= Hardware.hypothetical(80).usable_gb()  # per GPU, not the 304 GB sum
    qlora = next(m for m in big.methods if m.method == "qlora")
    assert qlora.fits and qlora.distributed == "ddp" and qlora.processes == 1  # fits one GPU: no sharding
    assert (
        "lora"
        not in describe_model(matrix.get("meta-llama/Llama-3.1-70B"), Hardware.hypothetical(80), defaults).fits_methods
    )


def test_fsdp_is_chosen_by_validation_and_launches_with_the_fsdp_config(matrix, defaults, tmp_path):
    from llm_mcp.core.fit import plan_memory
    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.jobs.local import accelerate_command

    entry = matrix.get("meta-llama/Llama-3.1-70B")
    kw = dict(target_modules=entry.target_modules, rank=32, batch_size=4, seq_len=1024)
    plan = plan_memory(entry, "lora", Hardware.hypothetical(80, num_gpus=4), **kw)
    assert (plan.distributed, plan.processes, plan.fits) == ("fsdp", 4, True)
    assert plan.estimate.shards == 4
    # with the processes given, replicated DDP is tried first and fails per device; 2 shards are still too few
    assert (
        plan_memory(entry, "lora", Hardware.hypothetical(80, num_gpus=8), num_processes=4, **kw).distributed == "fsdp"
    )
    assert not plan_memory(entry, "lora", Hardware.hypothetical(80, num_gpus=4), num_processes=2, **kw).fits
    assert not plan_memory(entry, "qlora", Hardware.hypothetical(16, num_gpus=8), **kw).fits  # 4-bit: never sharded
    base = {
        "model": {"id": "m", "path": "m"},
        "method": "lora",
        "dataset": "d",
        "learning_rate": 1e-4,
        "batch_size": 1,
        "gradient_accumulation": 1,
        "max_seq_len": 8,
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "warmup_ratio": 0,
        "weight_decay": 0,
        "max_grad_norm": 1,
        "lora": {"rank": 8, "alpha": 8, "dropout": 0, "target_modules": ["q_proj"]},
    }
    old = JobConfig.parse({**base, "num_processes": 2})  # a config.json written before the field existed
    assert old.distributed == "ddp" and "ddp.yaml" in " ".join(accelerate_command(old, tmp_path))
    fsdp = JobConfig.parse({**base, "version": 1, "num_processes": 4, "distributed": "fsdp"})
    assert "fsdp.yaml" in " ".join(accelerate_command(fsdp, tmp_path))
    assert "single.yaml" in " ".join(accelerate_command(JobConfig.parse(base), tmp_path))


def test_gradient_checkpointing_is_decided_by_the_estimate_without_it(matrix, defaults, tmp_path):
    """Llama-2-7B LoRA at start_finetune's defaults (batch 4 x 1024): the estimate reported is the one for the
    decision, and checkpointing goes on exactly when the job does not fit without it."""
    from llm_mcp.core.fit import CHECKPOINTING_MARGIN, plan_memory

    entry = matrix.get("meta-llama/Llama-2-7b-hf")
    kw = dict(target_modules=entry.target_modules, rank=32, batch_size=4, seq_len=1024)
    on = estimate_memory(entry.dims, entry.params_b, "lora", gradient_checkpointing=True, **kw)
    off = estimate_memory(entry.dims, entry.params_b, "lora", gradient_checkpointing=False, **kw)
    assert off.activations_gb > 8 * on.activations_gb - 8 * 1.0  # ~L x more, less the shared fp32 logits
    for gpu_gb in (24, 32, 40, 80):
        plan = plan_memory(entry, "lora", Hardware.hypothetical(gpu_gb), **kw)
        fits_without = off.total_gb <= Hardware.hypothetical(gpu_gb).usable_gb() * (1 - CHECKPOINTING_MARGIN)
        assert plan.fits and plan.gradient_checkpointing is (not fits_without), gpu_gb
        assert plan.estimate == (on if plan.gradient_checkpointing else off)
    # 32 GB: the old rule (checkpointed estimate <= 70% of usable -> off) switched it off, and the job needs ~35 GB
    assert (
        on.total_gb
        <= 0.7 * Hardware.hypothetical(32).usable_gb()
        < Hardware.hypothetical(32).usable_gb()
        < off.total_gb
    )
    assert plan_memory(entry, "lora", Hardware.hypothetical(32), **kw).gradient_checkpointing is True
    forced = plan_memory(entry, "lora", Hardware.hypothetical(40), gradient_checkpointing=True, **kw)
    assert forced.gradient_checkpointing and forced.estimate == on


def test_unsupported_never_fits(matrix, defaults):
    entry = matrix.get("deepseek-ai/DeepSeek-V3.1")
    assert describe_model(entry, Hardware.hypothetical(80, num_gpus=1000), defaults).fits_methods == []


def test_qlora_needs_less_than_lora_and_cpu_estimates_use_fp32(matrix):
    from llm_mcp.core.shapes import NF4_BYTES_PER_PARAM, GiB, embedding_param_count

    entry = matrix.get("Qwen/Qwen3-8B")
    kw = dict(target_modules=entry.target_modules)
    lora = estimate_memory(entry.dims, entry.params_b, "lora", **kw)
    qlora = estimate_memory(entry.dims, entry.params_b, "qlora", **kw)
    cpu = estimate_memory(entry.dims, entry.params_b, "lora", device="cpu", **kw)
    # Linear weights drop to ~4.13 bits; the untied 152k-vocab embeddings + head (1.24B params) are upcast to
    # fp32 by prepare_model_for_kbit_training: ~5 GB, not the 2.3 GB bf16 would be.
    embed = embedding_param_count(entry.dims)
    expected = ((entry.params_b * 1e9 - embed) * NF4_BYTES_PER_PARAM + embed * 4) / GiB
    assert qlora.weights_gb == pytest.approx(expected, abs=0.01) and qlora.weights_gb < 0.55 * lora.weights_gb
    assert cpu.weights_gb == pytest.approx(2 * lora.weights_gb, rel=0.01)


def test_sparse_estimate_counts_int64_indices_and_rigl_candidates(matrix):
    entry = matrix.get("Qwen/Qwen3-8B")
    kw = dict(target_modules=entry.target_modules)
    lora = estimate_memory(entry.dims, entry.params_b, "lora", **kw)
    sparse = estimate_memory(entry.dims, entry.params_b, "sparse", **kw)
    rigl = estimate_memory(entry.dims, entry.params_b, "sparse", rigl_fraction=0.3, **kw)
    assert sparse.trainable_params == lora.trainable_params
    assert sparse.trainable_gb == pytest.approx(2 * lora.trainable_gb, abs=0.02)  # 32 bytes per entry, not 16
    largest = 4096 * 12288 * 5 / 2**30  # one dense fp32 gradient + sign bits of the biggest MLP matrix
    candidates = 2 * 0.3 * sparse.trainable_params * 12 / 2**30
    assert rigl.trainable_gb - sparse.trainable_gb == pytest.approx(largest + candidates, abs=0.02)


def test_vllm_servers_claim_gpu_memory_and_free_memory_is_reread(tmp_path):
    import subprocess
    import sys
    import time

    from llm_mcp.core import hardware

    assert Hardware.hypothetical(80).usable_gb() == 76.0
    assert Hardware(gpus=[hardware.GPU("x", 80.0)] * 2, claimed_fraction=0.5).usable_gb() == 36.0
    assert Hardware(gpus=[hardware.GPU("x", 80.0)], claimed_fraction=1.0).usable_gb() == 0.0
    before = hardware.vllm_claimed_fraction()
    # two processes whose command lines are those of vLLM servers started at 0.5 (what the managed pool uses)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; time.sleep(60)",
                "-m",
                hardware.VLLM_ENTRY,
                "--gpu-memory-utilization",
                "0.5",
            ]
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 10
        while hardware.vllm_claimed_fraction() < min(1.0, before + 1.0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hardware.vllm_claimed_fraction() == min(1.0, before + 1.0)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    hardware._FREE.update(at=time.monotonic() - hardware.FREE_TTL_S - 1, gb=[1.0])
    hardware._free_gb(1)  # stale: read again (no nvidia-smi here: unknown)
    assert hardware._FREE["at"] > time.monotonic() - 1


def test_fits_filter_on_this_cpu_machine(matrix, defaults):
    hw = detect()
    result = list_models(matrix, hw, defaults, fits=True)
    assert all(m.fits_methods for m in result.models)
    assert all(i.estimated_memory_gb <= hw.usable_gb() for m in result.models for i in m.methods if i.fits)
    assert "moonshotai/Kimi-K2-Thinking" not in {m.id for m in result.models}


def test_summary_is_one_line_per_model(matrix, defaults):
    result = list_models(matrix, Hardware.hypothetical(24), defaults, family="llama")
    text = summarize(result)
    assert text.count("\n- ") == result.count
    assert "meta-llama/Llama-2-7b-hf" in text and "24 GB" in text


def test_usable_memory_does_not_drift_with_free_ram_and_a_tight_machine_is_warned_about(matrix, defaults, tmp_path):
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.core.store import JobStore
    from llm_mcp.tiny import make_tiny_model
    from llm_mcp.validation.finetune import ValidationContext, resolve_finetune
    from llm_mcp.validation.requests import FinetuneRequest

    busy, idle = Hardware(ram_gb=24.0, available_ram_gb=0.05), Hardware(ram_gb=24.0, available_ram_gb=22.0)
    assert busy.usable_gb() == idle.usable_gb() == round(24.0 * 0.85, 2)
    model = make_tiny_model(tmp_path / "models" / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    settings = Settings(home=tmp_path, models_path=data_path("models.yaml"))
    args = {"model": str(model), "method": "lora", "dataset": str(data)}

    def run(hw):
        context = ValidationContext(
            matrix=matrix, settings=settings, defaults=defaults, hardware=hw, store=JobStore(tmp_path)
        )
        return resolve_finetune(FinetuneRequest.parse(dict(args), "start_finetune"), context).warnings

    assert any("free right now" in w for w in run(busy))
    assert not any("free right now" in w for w in run(idle))


def test_each_method_says_what_it_adapts(matrix, defaults):
    """An MoE model's LoRA / QLoRA adapt its experts too; DoRA and sparse the attention only."""
    from llm_mcp.core.listing import describe_model

    info = describe_model(matrix.get("Qwen/Qwen3-30B-A3B"), detect(), defaults, full=True)
    adapts = {m.method: m.adapts for m in info.methods}
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert adapts["lora"] == adapts["qlora"] == ["q_proj", "k_proj", "v_proj", "o_proj", *experts]
    assert adapts["dora"] == adapts["sparse"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    dense = describe_model(matrix.get("Qwen/Qwen3-8B"), detect(), defaults, full=True)
    assert dense.methods[0].adapts == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
