"""What a GPU review found in the GPU and real-model paths, checked where a CPU can reach them: the decisions
(dtypes, device visibility, vLLM's command line, tolerances, loading options) are plain code, and files saved on a
GPU can be made here byte for byte. The runs that need a GPU are in tests/test_gpu.py."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch


def as_saved_on_cuda(path: Path) -> None:
    """Rewrite a torch.save file so its tensors say they were saved from cuda:0 (what a GPU job's checkpoint holds):
    the storage location in the pickle is the only difference."""
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(info, data)


def test_a_checkpoint_saved_on_a_gpu_resumes_on_each_ranks_own_device(tmp_path):
    """torch.load without map_location puts a cuda:0 checkpoint on cuda:0 in every rank (here: fails outright,
    as it would on a rank whose cuda:0 is not its GPU)."""
    from accelerate import Accelerator

    from llm_mcp.train.checkpoint import load_checkpoint

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 7}, tmp_path / "trainer_state.pt"
    )
    as_saved_on_cuda(tmp_path / "trainer_state.pt")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "trainer_state.pt", weights_only=False)  # the file really says cuda:0
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert load_checkpoint(Accelerator(cpu=True), fresh, sched, tmp_path) == 7
    assert all(v.device.type == "cpu" for s in fresh.state.values() for v in s.values() if torch.is_tensor(v))


def test_cuda_visible_devices_picks_the_gpus_a_job_plans_on():
    from llm_mcp.core.hardware import visible

    rows = [[str(i), f"GPU-{i}aaa-{i}", f"H100 #{i}", "81559"] for i in range(4)]
    assert visible(rows, None) == rows and visible(rows, "") == []
    assert visible(rows, "3") == [rows[3]]  # one GPU of four: plan on that one, not on all four
    assert visible(rows, "2,0") == [rows[2], rows[0]]  # CUDA's order
    assert visible(rows, "GPU-1aaa") == [rows[1]]  # a UUID prefix
    assert visible(rows, "1,7,2") == [rows[1]]  # CUDA stops at the first id that matches nothing
    assert visible(rows, "1,1") == [rows[1]]


def test_ddp_does_not_broadcast_the_sparse_index_buffers_every_forward():
    from accelerate import Accelerator

    from llm_mcp.train.run import ddp_kwargs

    acc = Accelerator(cpu=True, kwargs_handlers=ddp_kwargs())
    assert acc.ddp_handler is not None and acc.ddp_handler.broadcast_buffers is False
    assert acc.ddp_handler.to_kwargs() == {"broadcast_buffers": False}  # what accelerate passes to DDP


def test_gpt_oss_mxfp4_experts_load_dequantized_for_training():
    from transformers import GptOssConfig

    from llm_mcp.modeling.base import dequantized

    shipped = GptOssConfig(quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["router"]})
    kwargs = dequantized(shipped)
    assert kwargs["quantization_config"].dequantize is True
    assert dequantized(GptOssConfig()) == {}  # a bf16 checkpoint loads as it is


def test_a_qlora_merge_dequantizes_into_the_checkpoints_own_dtype(tmp_path):
    """A bf16 checkpoint's QLoRA merge is bf16 (16 GB for 8B parameters), not fp32 (32 GB, and 280 GB of RAM for
    70B); a checkpoint that says nothing stays fp32."""
    from llm_mcp.modeling.base import checkpoint_dtype
    from llm_mcp.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    assert checkpoint_dtype(str(model)) is torch.float32
    config = (model / "config.json").read_text()
    import json

    (model / "config.json").write_text(json.dumps({**json.loads(config), "dtype": "bfloat16"}))
    assert checkpoint_dtype(str(model)) is torch.bfloat16


def test_the_served_adapter_check_allows_bf16_rounding_at_real_logit_sizes(tmp_path):
    """A model's bf16 forward against its fp32 forward (what vLLM on a GPU is against the trainer's probe) differs
    by more than the old fixed 0.1 once logits are as large as real models' (~20-45); the tolerance follows them."""
    from transformers import AutoModelForCausalLM

    from llm_mcp.inference.serving.sampler import probe_tolerance
    from llm_mcp.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "t", hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 500, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits as large as a real model's
        fp32 = model(input_ids=ids).logits[0].float()
        bf16 = model.to(torch.bfloat16)(input_ids=ids).logits[0].float()
    target = ids[0, 1:, None]
    logp = lambda logits: logits[:-1].log_softmax(-1).gather(1, target)  # noqa: E731
    diff = (logp(fp32) - logp(bf16)).abs().max().item()
    largest = fp32.abs().max().item()
    assert largest > 20 and diff > 0.1  # the old tolerance refused this
    assert diff < probe_tolerance(True, largest)
    assert probe_tolerance(False, largest) == 2e-3  # CPU: both fp32


def test_a_managed_vllm_asks_for_what_is_free_and_a_bounded_context(tmp_path):
    """A fixed --gpu-memory-utilization 0.5 cannot hold an 8B model's 16 GB on a 24 GB GPU, and vLLM refuses to
    start when the fraction is more than is free (a training job, another server); without --max-model-len it
    reserves KV cache for Llama 3.1's 128k context."""
    import json

    from llm_mcp.inference.serving.server import MAX_MODEL_LEN, VllmError, gpu_memory_utilization
    from llm_mcp.inference.serving.servers import VllmPool, VllmServer

    assert gpu_memory_utilization(24, 23.5, 16.1, "llama-8b") == pytest.approx(0.9)  # an idle 24 GB GPU
    assert gpu_memory_utilization(80, 41.0, 16.1, "llama-8b") == pytest.approx(0.5)  # a training job holds 39 GB
    with pytest.raises(VllmError, match=r"3.0 of 24 GB free.*16.1 GB.*cancel_job.*--sampler transformers"):
        gpu_memory_utilization(24, 3.0, 16.1, "llama-8b")

    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 131072}))
    pool = VllmPool(tmp_path / "home")  # CPU: no GPU query
    cmd = pool._command(VllmServer(model_path=str(model), name="llama", url="", api_key="k"), False, 8000)
    assert cmd[cmd.index("--max-model-len") + 1] == str(MAX_MODEL_LEN)


def test_the_download_command_the_errors_name_is_the_installed_one():
    """huggingface_hub 2 ships `hf download`; `huggingface-cli` is gone."""
    import shutil
    import subprocess
    import sys

    from llm_mcp.core.hub import unavailable_message

    message = unavailable_message("meta-llama/Llama-3.1-8B", "not in the local cache")
    assert "`hf download meta-llama/Llama-3.1-8B`" in message
    hf = shutil.which("hf", path=str(Path(sys.executable).parent))
    assert hf is not None and shutil.which("huggingface-cli", path=str(Path(sys.executable).parent)) is None
    assert "download" in subprocess.run([hf, "--help"], capture_output=True, text=True, timeout=60).stdout


def test_fsdp_is_refused_when_the_nodes_ram_cannot_hold_a_copy_per_rank(matrix, defaults, tmp_path):
    """transformers 5 builds a full-size CPU copy of the weights in every rank before sharding: 8 ranks of
    Llama-3.1-70B need ~1.1 TB of host RAM."""
    from llm_mcp.core.errors import InvalidArgumentError
    from llm_mcp.core.hardware import GPU, Hardware
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.core.store import JobStore
    from llm_mcp.validation.finetune import ValidationContext, resolve_finetune
    from llm_mcp.validation.requests import FinetuneRequest

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 64)
    settings = Settings(home=tmp_path, models_path=data_path("models.yaml"))
    request = FinetuneRequest.parse(
        {"model": "meta-llama/Llama-3.1-70B", "method": "lora", "dataset": str(data)}, "start_finetune"
    )

    def refusal(ram_gb: float) -> str:
        hw = Hardware(
            gpus=[GPU("NVIDIA H100 80GB HBM3", 80.0)] * 8, ram_gb=ram_gb, available_ram_gb=ram_gb, cpu_count=64
        )
        ctx = ValidationContext(
            matrix=matrix, settings=settings, defaults=defaults, hardware=hw, store=JobStore(tmp_path)
        )
        with pytest.raises(InvalidArgumentError) as err:  # refused either way here: for RAM, or for hub access
            resolve_finetune(request, ctx)
        return str(err.value)

    small = refusal(1024)
    assert "host RAM" in small and "1024 GB" in small and "num_processes" in small, small
    assert "host RAM" not in refusal(4096)


def test_a_download_is_checked_against_the_free_disk_first(tmp_path):
    from llm_mcp.jobs.fetch import room_needed, wanted

    gb = 2**30
    assert room_needed(16 * gb, 0, 40 * gb, tmp_path) is None
    short = room_needed(16 * gb, 4 * gb, 10 * gb, tmp_path)  # 12 GB to go (+1 GB margin), 10 free
    assert short and "13.0 GB more" in short and "10.0 GB is free" in short and "HF_HUB_CACHE" in short
    assert wanted("model-00001-of-00004.safetensors") and wanted("tokenizer.json")
    assert not wanted("original/consolidated.00.pth") and not wanted("pytorch_model.bin")


def test_the_jobs_environment_carries_the_hub_settings_and_never_the_token(monkeypatch, tmp_path):
    from llm_mcp.core.jobconfig import JobConfig
    from llm_mcp.jobs.local import job_environment, secret_environment

    monkeypatch.setenv("HF_HOME", "/shared/hf")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    cfg = JobConfig.parse({"model": {"id": "m", "path": "m"}, "method": "lora", "dataset": "d", "learning_rate": 1e-4,
                           "lora": {"rank": 8, "alpha": 8, "dropout": 0, "target_modules": ["q_proj"]}})  # fmt: skip
    env = job_environment(cfg, 2, tmp_path)
    assert env["HF_HOME"] == "/shared/hf" and "HF_TOKEN" not in env  # written into sbatch scripts and dry runs
    assert secret_environment() == {"HF_TOKEN": "hf_secret"}  # added only to what is sent to Ray


def test_job_status_shows_a_download_in_progress():
    from llm_mcp.jobs.status import JobStatus, summarize_status

    status = JobStatus(job_id="ft-1", name="n", state="running", model="meta-llama/Llama-3.1-8B", method="lora",
                       created_at=0, job_dir="/j", download={"model": "meta-llama/Llama-3.1-8B",
                       "downloaded_bytes": 3 * 2**30, "total_bytes": 16 * 2**30, "rate_bps": 50 * 2**20,
                       "eta_s": 266})  # fmt: skip
    assert "downloading meta-llama/Llama-3.1-8B: 3.0 of 16.0 GB at 50 MB/s, ETA 266 s" in summarize_status(status)


def hub_model_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """A Hugging Face hub cache holding `repo` with the files of `model_dir`, as huggingface_hub lays them out."""
    import hashlib
    import os

    sha = "3" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    for path in model_dir.iterdir():
        data = path.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = base / "snapshots" / sha / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs" / "main").write_text(sha)
    return root


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_hub_model_in_the_cache_trains_offline_and_the_job_says_where_it_came_from(home, tmp_path):
    """A matrix model by its hub id, from a local cache laid out as the hub lays it out (tiny weights under the
    real id), offline: validation finds it, the supervisor's fetch finds it complete, the trainer loads it."""
    import json
    import sys

    from mcp import Client, StdioServerParameters

    from llm_mcp.tiny import make_tiny_model
    from tests.conftest import LEARNABLE_ROWS, server_env, wait_final

    cache = hub_model_cache(tmp_path / "hub", "meta-llama/Llama-3.2-1B", make_tiny_model(tmp_path / "tiny"))
    (home / "data").mkdir()
    (home / "data" / "train.jsonl").write_text("".join(json.dumps(LEARNABLE_ROWS[i % 4]) + "\n" for i in range(16)))
    env = server_env(home, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp", "serve"], env=env)
    async with Client(params) as client:
        args = dict(model="meta-llama/Llama-3.2-1B", method="lora", dataset="data/train.jsonl", max_steps=2,
                    batch_size=1, max_seq_len=64, checkpoint_every=0)  # fmt: skip
        started = await client.call_tool("start_finetune", args)
        assert not started.is_error, started.content[0].text
        assert "local cache" in started.structured_content["estimates"]["model_source"]
        final = await wait_final(client, started.structured_content["job_id"])
    assert final["state"] == "succeeded", final
    events = [json.loads(x) for x in (Path(final["job_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "download", "state": "cached", "model": "meta-llama/Llama-3.2-1B"}.items() <= events[0].items()
