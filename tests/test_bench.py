"""Smoke test: every benchmark command runs on a tiny setting and writes its report.

Benchmarks are never timed unit tests; this only checks they run and report what they promise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "which,keys",
    [
        ("train", ["workloads", "device"]),
        ("methods", ["methods"]),
        ("server", ["cold_start_s", "stdio", "streamable_http", "start_finetune_ms"]),
        ("sample", ["transformers", "adapter_switch_ms"]),
    ],
)
def test_benchmark_runs_on_a_tiny_setting(tmp_path, which, keys):
    """`sample` runs without its vLLM side here: tests/test_vllm.py drives vLLM serving itself."""
    out = tmp_path / which
    extra = ["--no-vllm"] if which == "sample" else []
    proc = subprocess.run(
        [sys.executable, "-m", "llm_mcp", "bench", which, "--tiny", "--reps", "1", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert all(k in results for k in keys)
    assert (out / "results.md").read_text().count("|") > 10
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    if which == "train":  # two workload shapes, each ours vs the HF Trainer with ratios
        assert set(results["workloads"]) == {"prompt-heavy", "chat"}
        for shape in results["workloads"].values():
            assert set(shape["paths"]) == {"ours", "hf_trainer"} and shape["paths"]["hf_trainer"]["speed_vs_hf"] == 1.0
            assert shape["paths"]["ours"]["tokens_per_s"] > 0 and shape["paths"]["ours"]["estimate_gb"] > 0
    if which == "sample":
        assert results["vllm"] == "skipped (--no-vllm)" and results["transformers"]["tokens_per_s"] > 0
    if which == "methods":
        assert set(results["methods"]) == {"lora", "qlora", "dora", "sparse"}
        assert results["methods"]["lora"]["time_ratio"] == 1.0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_benchmark_without_a_gpu_says_so():
    proc = subprocess.run(
        [sys.executable, "-m", "llm_mcp", "bench", "train", "--device", "cuda", "--tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr and "omit --device" in proc.stderr
