"""list_models logic: filters, memory estimates and hardware fit."""

from __future__ import annotations

import pytest

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.estimates import GPU_CLASSES_GB, estimate_memory
from llm_mcp.core.hardware import Hardware, detect
from llm_mcp.core.listing import describe_model, list_models, summarize
from llm_mcp.core.matrix import METHODS


def test_whole_matrix_without_filters(matrix, defaults):
    result = list_models(matrix, detect(), defaults)
    assert result.count == result.total_in_matrix == len(matrix.models) >= 45
    assert result.hardware.source == "detected"


def test_method_filter_drops_unsupported(matrix, defaults):
    ids = {m.id for m in list_models(matrix, detect(), defaults, method="sparse").models}
    assert "mistralai/Mixtral-8x7B-v0.1" not in ids  # sparse: unsupported in seed 002
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
            est = estimate_memory(entry.dims, entry.params_b, method, target_modules=entry.target_modules,
                                  batch_size=1, seq_len=2048, device="cuda").total_gb
            assert est <= Hardware.hypothetical(support.min_gpu_memory_gb).usable_gb(), (entry.id, method)
            smaller = [c for c in GPU_CLASSES_GB if c < support.min_gpu_memory_gb]
            if smaller:
                assert est > Hardware.hypothetical(smaller[-1]).usable_gb(), (entry.id, method, smaller[-1])


@pytest.mark.parametrize("gpu_gb", [16, 24, 40, 80])
def test_fits_in_list_models_is_what_start_finetune_accepts_at_its_defaults(matrix, defaults, gpu_gb, tmp_path):
    """list_models(fits=true) and start_finetune's memory check use the same estimate at the same defaults."""
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.core.store import JobStore
    from llm_mcp.core.validate import resolve_finetune

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
                resolve_finetune(matrix=matrix, settings=settings, defaults=defaults, hardware=hw,
                                 store=JobStore(tmp_path), args={"model": entry.id, "method": method,
                                                                 "dataset": str(data)})
            refused_for_memory = "estimated memory" in str(err.value)
            assert refused_for_memory is (method not in fits), (entry.id, method, str(err.value)[:200])
            checked += 1
    assert checked > 20


def test_several_gpus_add_up(matrix, defaults):
    entry = matrix.get("meta-llama/Llama-3.1-70B")
    assert "lora" not in describe_model(entry, Hardware.hypothetical(80), defaults).fits_methods
    assert "lora" in describe_model(entry, Hardware.hypothetical(80, num_gpus=4), defaults).fits_methods


def test_unsupported_never_fits(matrix, defaults):
    entry = matrix.get("deepseek-ai/DeepSeek-V3.1")
    assert describe_model(entry, Hardware.hypothetical(80, num_gpus=1000), defaults).fits_methods == []


def test_qlora_needs_less_than_lora_and_cpu_estimates_use_fp32(matrix):
    entry = matrix.get("Qwen/Qwen3-8B")
    kw = dict(target_modules=entry.target_modules)
    lora = estimate_memory(entry.dims, entry.params_b, "lora", **kw)
    qlora = estimate_memory(entry.dims, entry.params_b, "qlora", **kw)
    cpu = estimate_memory(entry.dims, entry.params_b, "lora", device="cpu", **kw)
    # Linear weights drop to ~4.13 bits; the untied 152k-vocab embeddings (1.24B params) stay bf16.
    assert qlora.weights_gb < 0.4 * lora.weights_gb
    assert cpu.weights_gb == pytest.approx(2 * lora.weights_gb, rel=0.01)


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
    from llm_mcp.core.validate import resolve_finetune
    from llm_mcp.tiny import make_tiny_model

    busy, idle = Hardware(ram_gb=24.0, available_ram_gb=0.05), Hardware(ram_gb=24.0, available_ram_gb=22.0)
    assert busy.usable_gb() == idle.usable_gb() == round(24.0 * 0.85, 2)
    model = make_tiny_model(tmp_path / "models" / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    settings = Settings(home=tmp_path, models_path=data_path("models.yaml"))
    args = {"model": str(model), "method": "lora", "dataset": str(data)}
    run = lambda hw: resolve_finetune(matrix=matrix, settings=settings, defaults=defaults, hardware=hw,  # noqa: E731
                                      store=JobStore(tmp_path), args=dict(args)).warnings
    assert any("free right now" in w for w in run(busy))
    assert not any("free right now" in w for w in run(idle))
