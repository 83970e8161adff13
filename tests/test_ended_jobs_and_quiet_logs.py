"""Messages for jobs that ended without an adapter; bitsandbytes' kernels-community warning kept out of logs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.store import Job, JobStore
from llm_mcp.inference.targets import job_adapter

CONFIG = {
    "model": {"id": "tiny", "path": "/unused"},
    "method": "lora",
    "dataset": "unused.jsonl",
    "learning_rate": 1e-3,
    "batch_size": 1,
    "gradient_accumulation": 1,
    "max_seq_len": 64,
    "checkpoint_every": 10,
    "keep_checkpoints": 1,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "lora": {"rank": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}


def job(store: JobStore, job_id: str, state: str) -> Job:
    j = Job(
        id=job_id,
        name=job_id,
        state=state,
        model="tiny",
        method="lora",
        device_set="cpu",
        created_at=time.time(),
        config=JobConfig.parse({**CONFIG, "job_id": job_id}),
    )
    store.insert(j)
    return j


def adapter_error(store: JobStore, j: Job, checkpoint: str) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        job_adapter(store, j, checkpoint)
    return str(info.value)


def test_ended_job_without_adapter_says_it_never_will_have_one(home):
    store = JobStore(home)
    failed = job(store, "ft-failed", "failed")
    for checkpoint in ("final", "latest"):
        msg = adapter_error(store, failed, checkpoint)
        assert "ft-failed failed before writing a final adapter and has no checkpoint" in msg, msg
        assert "start_finetune again (job_status shows the cause)" in msg
        assert "wait" not in msg and "yet" not in msg

    cancelled = job(store, "ft-cancelled", "cancelled")
    (store.job_dir("ft-cancelled") / "checkpoints" / "step-000010" / "adapter").mkdir(parents=True)
    msg = adapter_error(store, cancelled, "final")
    assert "ft-cancelled was cancelled before writing a final adapter" in msg, msg
    assert "checkpoint='latest'" in msg and "[10]" in msg and "resume_from='ft-cancelled'" in msg
    assert "yet" not in msg
    path, label = job_adapter(store, cancelled, "latest")
    assert label == "step 10" and path.parent.name == "step-000010"


def test_unfinished_job_keeps_the_wait_messages(home):
    store = JobStore(home)
    running = job(store, "ft-running", "running")
    assert "has no final adapter yet; wait for its first checkpoint" in adapter_error(store, running, "final")
    assert "has no checkpoint yet" in adapter_error(store, running, "latest")


NOISE = "kernels-community"


def _stderr(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


def _avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


ENTRIES = {  # every process we start that may import bitsandbytes, up to where it must be quiet
    "trainer": "import llm_mcp.train.run",  # accelerate launch -m llm_mcp.train.run: at import
    "sampler": "from llm_mcp.inference.sampling import TransformersSampler; TransformersSampler()",
    # the merge worker, as far as its first line (the lock file is missing, so it stops there)
    "merge": "from llm_mcp.inference.exports.worker import main\ntry:\n    main('/nonexistent/lock')\n"
    "except OSError:\n    pass",
}


def test_every_entry_point_installs_the_filter():
    # One process, bitsandbytes never imported: between entries, take the filter off again.
    code = [
        "import logging",
        "from llm_mcp.core import quiet",
        "def on():\n    return all(quiet._FILTER in logging.getLogger(n).filters for n in quiet._BNB_LOGGERS)",
    ]
    for name, entry in ENTRIES.items():
        code += [
            f"assert not on(), {name!r}",
            entry,
            f"assert on(), {name!r}",
            "for n in quiet._BNB_LOGGERS:\n    logging.getLogger(n).removeFilter(quiet._FILTER)",
        ]
    code.append("import sys\nassert 'bitsandbytes' not in sys.modules")
    _stderr("\n".join(code))


def test_bitsandbytes_kernels_notice_is_silenced():
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    if _avx512_bf16():  # precondition: without the filter, importing bitsandbytes does log it on this CPU
        assert NOISE in _stderr("import bitsandbytes")
    err = _stderr(
        f"{ENTRIES['trainer']}\nimport peft, bitsandbytes\nimport logging\n"
        "logging.getLogger('bitsandbytes').warning('other bitsandbytes warnings still show')"
    )
    assert NOISE not in err, err
    assert "other bitsandbytes warnings still show" in err
