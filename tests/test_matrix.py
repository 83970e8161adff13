"""The support matrix: every seed model present, schema errors listed, facts from REFERENCE kept."""

from __future__ import annotations

import copy

import pytest
import yaml

from llm_mcp.core.errors import ConfigurationError, UnknownModelError
from llm_mcp.core.estimates import estimate_memory
from llm_mcp.core.matrix import load_matrix, parse_matrix
from llm_mcp.core.methods import METHODS
from llm_mcp.core.settings import data_path
from llm_mcp.core.shapes import lora_param_count

SEED_MODELS = [
    # seed 000, Tinker lineup
    "Qwen/Qwen3-VL-235B-A22B-Instruct",
    "Qwen/Qwen3-VL-30B-A3B-Instruct",
    "Qwen/Qwen3-235B-A22B-Instruct-2507",
    "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "Qwen/Qwen3-30B-A3B",
    "Qwen/Qwen3-30B-A3B-Base",
    "Qwen/Qwen3-32B",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-8B-Base",
    "Qwen/Qwen3-4B-Instruct-2507",
    "openai/gpt-oss-120b",
    "openai/gpt-oss-20b",
    "deepseek-ai/DeepSeek-V3.1",
    "deepseek-ai/DeepSeek-V3.1-Base",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.3-70B-Instruct",
    "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.2-3B",
    "meta-llama/Llama-3.2-1B",
    "moonshotai/Kimi-K2-Thinking",
    # seed 004
    "Qwen/Qwen3-1.7B",
    # seed 002 matrix, by the names the document uses
    "meta-llama/Llama-2-7b",
    "meta-llama/Llama-2-13b",
    "meta-llama/Llama-2-70b",
    "mistralai/Mistral-7B",
    "mistralai/Mixtral-8x7B",
    "tiiuae/falcon-7b",
    "tiiuae/falcon-40b",
    # seed 002 vLLM lists
    "meta-llama/Llama-2-7b-chat-hf",
    "meta-llama/Llama-2-13b-chat-hf",
    "meta-llama/Llama-2-70b-chat-hf",
    "meta-llama/Llama-3-8b-instruct",
    "meta-llama/Llama-3-70b-instruct",
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.2",
    "mistralai/Mixtral-8x7B-v0.1",
    "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-hf",
    "codellama/CodeLlama-7b-hf",
    "codellama/CodeLlama-13b-hf",
    "codellama/CodeLlama-34b-hf",
    # seed 001
    "google/gemma-3-270m",
    "google/gemma-3-1b-pt",
    "google/gemma-3-1b-it",
    "google/gemma-3-4b-pt",
    "google/gemma-3-4b-it",
]

S, E, U = "supported", "experimental", "unsupported"
SEED_002_STATUSES = {  # lora, qlora, dora, sparse — as the seed's table gives them, except where noted
    "meta-llama/Llama-2-7b": (S, S, S, S),
    "meta-llama/Llama-2-13b": (S, S, S, S),
    "meta-llama/Llama-2-70b": (E, S, E, E),
    "mistralai/Mistral-7B": (S, S, S, S),
    # seed: (E, S, E, U). QLoRA is experimental as for -Instruct (same architecture and size); sparse trains the
    # attention of MoE models (experts frozen; tests/test_architectures.py), so it is experimental, not refused.
    "mistralai/Mixtral-8x7B": (E, E, E, E),
    "tiiuae/falcon-7b": (S, S, S, S),
    "tiiuae/falcon-40b": (S, S, S, S),
}


@pytest.fixture
def raw():
    return yaml.safe_load(data_path("models.yaml").read_text())


@pytest.mark.parametrize("model_id", SEED_MODELS)
def test_every_seed_model_resolves(matrix, model_id):
    entry = matrix.get(model_id)
    assert set(entry.methods) == set(METHODS)
    assert entry.recommended_lr > 0 and entry.target_modules


@pytest.mark.parametrize("model_id,statuses", SEED_002_STATUSES.items())
def test_seed_002_statuses_are_kept(matrix, model_id, statuses):
    entry = matrix.get(model_id)
    assert tuple(entry.methods[m].status for m in METHODS) == statuses


@pytest.mark.parametrize(
    "model_id,lr",
    [
        ("Qwen/Qwen3-8B", 1e-3),
        ("Qwen/Qwen3-30B-A3B-Base", 1e-3),
        ("meta-llama/Llama-3.2-1B", 1e-3),
        ("Qwen/Qwen3-32B", 3e-4),
        ("meta-llama/Llama-3.1-8B-Instruct", 3e-4),
        ("moonshotai/Kimi-K2-Thinking", 3e-4),
        ("deepseek-ai/DeepSeek-V3.1", 4e-4),
        ("openai/gpt-oss-20b", 1e-4),
        ("openai/gpt-oss-120b", 3e-4),
    ],
)
def test_learning_rates_follow_the_measured_sweep(matrix, model_id, lr):
    assert matrix.get(model_id).recommended_lr == lr


def test_formula_lr_for_models_outside_the_sweep(matrix):
    # 5e-5 * 10 * (2000/4096)^0.781 = 2.857e-4 for a Llama-exponent 4096-wide model
    assert matrix.get("meta-llama/Llama-2-7b").recommended_lr == pytest.approx(2.9e-4)
    assert "formula" in matrix.get("mistralai/Mistral-7B").lr_source


def test_vllm_cannot_serve_dora_or_sparse_adapters(matrix):
    for entry in matrix.models:
        assert not entry.methods["dora"].vllm_adapter, entry.id
        assert not entry.methods["sparse"].vllm_adapter, entry.id
    assert matrix.get("meta-llama/Llama-3.1-8B").methods["lora"].vllm_adapter
    assert not matrix.get("tiiuae/falcon-7b").methods["lora"].vllm_adapter  # vLLM's Falcon has no LoRA


def test_min_gpu_memory_covers_the_estimate(matrix):
    for entry in matrix.models:
        for m in METHODS:
            est = estimate_memory(entry.dims, entry.params_b, m, target_modules=entry.target_modules)
            assert entry.methods[m].min_gpu_memory_gb >= est.total_gb, (entry.id, m, est.total_gb)


def test_seed_memory_notes_agree_with_estimates(matrix):
    # Seed 002: Llama-2-7b "best for 24GB GPUs", Llama-2-13b "requires 40GB+ VRAM".
    assert matrix.get("meta-llama/Llama-2-7b").methods["lora"].min_gpu_memory_gb == 24
    assert matrix.get("meta-llama/Llama-2-13b").methods["lora"].min_gpu_memory_gb == 40


def test_lora_param_count_matches_the_formula(matrix):
    # Llama-3.1-8B, rank 32, all linear: per layer sum(in+out) = 81920; x 32 layers x 32.
    entry = matrix.get("meta-llama/Llama-3.1-8B")
    assert lora_param_count(entry.dims, entry.target_modules, 32) == 81920 * 32 * 32


def test_unknown_model_suggests_close_names(matrix):
    with pytest.raises(UnknownModelError) as err:
        matrix.get("Qwen/Qwen3-7B")  # seed 004's "Qwen 3 7B" does not exist
    assert "Qwen/Qwen3-8B" in str(err.value) and "list_models" in str(err.value)


def test_lookup_is_case_insensitive_and_knows_aliases(matrix):
    assert matrix.get("META-LLAMA/llama-2-7B").id == "meta-llama/Llama-2-7b-hf"


def test_every_problem_is_listed_with_entry_field_value_and_allowed_values(raw):
    bad = copy.deepcopy(raw)
    bad["models"][0]["methods"]["lora"]["status"] = "maybe"
    bad["models"][1]["recommended_lr"] = -1
    bad["models"][2]["colour"] = "blue"
    del bad["models"][3]["methods"]["sparse"]
    with pytest.raises(ConfigurationError) as err:
        parse_matrix(bad, source="bad.yaml")
    problems = err.value.problems
    assert len(problems) == 4, problems
    first = problems[0]
    assert bad["models"][0]["id"] in first and "methods.lora.status" in first
    assert "'maybe'" in first and "'supported', 'experimental' or 'unsupported'" in first
    assert any(bad["models"][1]["id"] in p and "recommended_lr" in p and "-1" in p for p in problems)
    assert any(bad["models"][2]["id"] in p and "colour" in p and "unknown field" in p for p in problems)
    assert any(bad["models"][3]["id"] in p and "sparse" in p for p in problems)
    assert "bad.yaml" in str(err.value)


def test_duplicate_names_are_refused(raw):
    bad = copy.deepcopy(raw)
    bad["models"][1]["aliases"] = [bad["models"][0]["id"].upper()]
    with pytest.raises(ConfigurationError, match="already used by"):
        parse_matrix(bad)


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_matrix(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmodels: [\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_matrix(broken)


def test_dora_is_never_called_dropout_lora():
    from llm_mcp.core.methods import METHODS

    assert "Weight-Decomposed" in METHODS["dora"].title
    text = data_path("models.yaml").read_text()
    assert "Dropout LoRA" not in text and "dropout lora" not in text.lower()


def test_default_targets_are_linear_layers_of_their_architecture(matrix):
    from llm_mcp.core.shapes import linear_names

    for entry in matrix.models:
        assert set(entry.target_modules) <= set(linear_names(entry.dims, entry.hf_architecture)), entry.id
