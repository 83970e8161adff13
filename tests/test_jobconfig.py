"""The job config contract: typed, versioned, strict; job directories written before versions still load."""

from __future__ import annotations

import json

import pytest

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.jobconfig import CONFIG_VERSION, JobConfig

# A config.json as the server wrote it before the typed config existed (no version; a dead key).
V0 = {
    "batch_size": 4,
    "gradient_accumulation": 1,
    "max_seq_len": 64,
    "train_on": "completion",
    "seed": 0,
    "checkpoint_every": 10,
    "keep_checkpoints": 3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "group_by_length": True,
    "model": {
        "id": "/h/models/tiny",
        "path": "/h/models/tiny",
        "trust_remote_code": False,
        "hf_architecture": "LlamaForCausalLM",
        "local": True,
    },
    "method": "sparse",
    "dataset": "/h/data/train.jsonl",
    "eval_dataset": None,
    "eval_fraction": 0.0,
    "max_steps": 25,
    "epochs": None,
    "learning_rate": 0.005,
    "num_processes": 1,
    "eval_every": 0,
    "lora": {
        "rank": 32,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": False,
        "bias": "none",
    },
    "quantization": None,
    "sparse": {
        "density": "auto",
        "sparsity_type": "unstructured",
        "mask_update_interval": 100,
        "mask_update_fraction": 0.3,
        "use_rigl": True,
        "quantize_base": False,
    },
    "device": "cpu",
    "request": {"model": "models/tiny", "method": "sparse", "max_steps": 25},
    "resume_from": None,
    "gradient_checkpointing": False,
    "job_id": "ft-20261121-055306-ec57",
    "accelerate_config": None,
}


def test_a_config_written_before_versions_loads_and_is_upgraded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V0))
    cfg = JobConfig.read(tmp_path)
    assert cfg.version == CONFIG_VERSION and cfg.job_id == "ft-20261121-055306-ec57"
    assert cfg.sparse.density == "auto" and cfg.total_steps(steps_per_epoch=3) == 25 and not cfg.quantized
    assert cfg.objective == "causal_lm"
    cfg.write(tmp_path)  # and round-trips in the current layout
    assert JobConfig.read(tmp_path) == cfg and json.loads((tmp_path / "config.json").read_text())["version"] == 1


@pytest.mark.parametrize(
    "change,where",
    [
        ({"learning_rte": 0.1}, "learning_rte"),  # a typo is an unknown key, not a silently ignored one
        ({"method": "LoRA+"}, "method"),
        ({"lora": {**V0["lora"], "rank": 0}}, "lora.rank"),
        ({"version": 99}, "newer than this server"),
    ],
)
def test_unknown_keys_and_bad_values_are_refused_with_their_field(change, where):
    with pytest.raises(ConfigurationError) as err:
        JobConfig.parse({**V0, **change})
    assert where in str(err.value)
