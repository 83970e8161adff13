"""Nothing lost: full disks, concurrent callers and bad local state never corrupt data, freeze other sessions
or stall the queue. One test per attack of the third adversarial pass (a small tmpfs for the full-disk ones:
they need root and are skipped with the reason without it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from mcp import Client

from llm_mcp.core.store import JobStore
from tests.conftest import LEARNABLE_ROWS, trained_home, wait_final

pytestmark = [pytest.mark.anyio, pytest.mark.reliability]

ROWS = [LEARNABLE_ROWS[i % 4] for i in range(1000)]


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (a full disk made real); skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of `directory` until `leave` bytes are free; returns the filler file."""
    filler = directory / "filler.bin"
    free = shutil.disk_usage(directory).free
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: no bytes left over for close() to fail on
        chunk = b"\0" * (1 << 16)
        todo = max(0, free - leave)
        while todo > 0:
            try:
                todo -= fh.write(chunk[: min(len(chunk), todo)]) or 0
            except OSError:
                break
    return filler


async def call(client, tool: str, **args):
    return await client.call_tool(tool, args)


# --- 1. an append on a nearly full disk leaves the dataset as it was ---------------------------------------


async def test_an_append_that_does_not_fit_leaves_the_dataset_whole_and_says_why(app, home):
    _, server = app
    with small_disk(home / "data", "400k") as data:
        async with Client(server) as client:
            saved = await call(client, "save_dataset", name="ds", rows=ROWS[:100])
            assert not saved.is_error, saved.content[0].text
            before = (data / "ds.jsonl").read_bytes()
            fill(data, leave=100_000)
            appended = await call(client, "save_dataset", name="ds", rows=ROWS, mode="append")
            text = appended.content[0].text
            assert appended.is_error and "No space left on device" in text and "MB free in" in text, text
            assert (data / "ds.jsonl").read_bytes() == before  # cut back to the byte
            inspected = await call(client, "datasets", path="data/ds.jsonl")
            assert inspected.structured_content["usable"] and inspected.structured_content["rows"] == 100
            assert not [p.name for p in data.iterdir() if ".tmp" in p.name]
            (data / "filler.bin").unlink()


def test_an_append_cut_short_by_the_disk_is_cut_back_to_the_byte(tmp_path):
    """The write itself (no free-space check first): a short write is followed by the error, then the cut-back."""
    from llm_mcp.core import atomic

    with small_disk(tmp_path / "disk", "256k") as disk:
        target = disk / "rows.jsonl"
        target.write_bytes(b'{"text": "a"}\n' * 100)
        before = target.read_bytes()
        fill(disk, leave=20_000)
        with pytest.raises(atomic.DiskFullError, match="No space left on device"):
            atomic.append(target, b'{"text": "b"}\n' * 10_000)
        assert target.read_bytes() == before
        assert atomic.append(target, b'{"text": "c"}\n') == len(before) + 14  # still appendable


# --- 2. two clients creating the same dataset: one wins, the other is told -------------------------------


async def test_two_clients_creating_one_dataset_at_once_cannot_both_be_told_it_saved(app, home):
    _, server = app
    rows_a = [{"prompt": f"a{i}", "completion": "x"} for i in range(300)]
    rows_b = [{"prompt": f"b{i}", "completion": "y"} for i in range(300)]
    async with Client(server) as one, Client(server) as two:
        for pair in range(10):
            results: dict[str, object] = {}

            async def save(client, key: str, rows: list, name: str = f"race{pair}", out: dict = results) -> None:
                out[key] = await call(client, "save_dataset", name=name, rows=rows)

            async with anyio.create_task_group() as tg:
                tg.start_soon(save, one, "a", rows_a)
                tg.start_soon(save, two, "b", rows_b)
            ok = [k for k, r in results.items() if not r.is_error]  # type: ignore[attr-defined]
            assert len(ok) == 1, {k: r.content[0].text for k, r in results.items()}  # type: ignore[attr-defined]
            loser = results["b" if ok == ["a"] else "a"]
            assert "already exists" in loser.content[0].text  # type: ignore[attr-defined]
            lines = (home / "data" / f"race{pair}.jsonl").read_text().splitlines()
            assert len(lines) == 300 and all(
                json.loads(line)["completion"] == ("x" if ok == ["a"] else "y") for line in lines
            )


# --- 3. exports to one destination at once: never a sha256 that is not the file's -----------------------


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory, tiny_model_template):
    """A state dir with two finished jobs (LoRA and DoRA) on the tiny model."""
    train = {"model": "models/tiny", "dataset": "data/train.jsonl", "max_steps": 3, "batch_size": 2,
             "max_seq_len": 64, "checkpoint_every": 0}  # fmt: skip
    return trained_home(tmp_path_factory.mktemp("two"), tiny_model_template, train, ("lora", "dora"))


def served(home: Path, **settings):
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.server import AppState, build_server

    state = AppState.load(Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers", **settings))
    return state, build_server(state)


async def test_exports_racing_for_one_destination_are_exclusive_and_their_hashes_true(two_jobs):
    home, ids = two_jobs
    state, server = served(home)
    async with Client(server) as client:
        jobs = [ids["lora"], ids["dora"]]
        for pair in range(4):
            dest = f"race-{pair}.tar.gz"
            results: dict[str, object] = {}

            async def export(job: str, key: str, dest: str = dest, out: dict = results) -> None:
                out[key] = await call(client, "export_adapter", job_id=job, format="archive", destination=dest)

            async with anyio.create_task_group() as tg:
                tg.start_soon(export, jobs[0], "a")
                tg.start_soon(export, jobs[1], "b")
            ok = [r for r in results.values() if not r.is_error]  # type: ignore[attr-defined]
            bad = [r for r in results.values() if r.is_error]  # type: ignore[attr-defined]
            assert len(ok) == 1 and len(bad) == 1, [r.content[0].text for r in results.values()]  # type: ignore
            assert "already holds an export of job" in bad[0].content[0].text
            files = ok[0].structured_content["files"]
            for f in files:
                assert hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() == f["sha256"]
        same: list = []

        async def export_same() -> None:
            same.append(await call(client, "export_adapter", job_id=jobs[0], format="peft", destination="same"))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(export_same)
        assert not [r.content[0].text for r in same if r.is_error]
        assert sorted(r.structured_content["reused"] for r in same) == [False, True, True]
    state.shutdown()


# --- 4. a locked job store delays only the calls that need it ---------------------------------------------


async def test_a_locked_job_store_freezes_no_other_session_and_ends_in_a_clear_error(app, home, tiny_model):
    _, server = app
    (home / "data").mkdir(exist_ok=True)
    (home / "data" / "held.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:8]) + "\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(14)", str(home / "jobs.db")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        async with Client(server) as waiting, Client(server) as other:
            timings: list[float] = []
            outcome: dict = {}

            async def evaluate() -> None:  # needs the store: waits for the lock, then says so
                outcome["r"] = await call(waiting, "evaluate", targets=["base"], model="models/tiny",
                                          dataset="data/held.jsonl", generate=False, wait_seconds=0)  # fmt: skip

            async def meanwhile() -> None:
                await anyio.sleep(1.0)
                for _ in range(3):
                    t0 = time.monotonic()
                    await other.list_tools()
                    await call(other, "list_models", family="qwen3")
                    timings.append(time.monotonic() - t0)
                    await anyio.sleep(1.0)

            async with anyio.create_task_group() as tg:
                tg.start_soon(evaluate)
                tg.start_soon(meanwhile)
        assert max(timings) < 1.0, timings
        r = outcome["r"]
        assert r.is_error and "jobs.db" in r.content[0].text and "locked" in r.content[0].text, r.content[0].text
    finally:
        holder.kill()
        holder.wait()


# --- 5. one broken model directory breaks nothing else ----------------------------------------------------


BROKEN_CONFIGS = {
    "list": [1, 2, 3],
    "null": None,
    "no-heads": "num_attention_heads=0",
    "nested": "architectures=nested",
}


def _break(tiny: Path, name: str, how) -> Path:
    bad = tiny.parent / name
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    if how == "num_attention_heads=0":
        cfg["num_attention_heads"] = 0
    elif how == "architectures=nested":
        cfg["architectures"] = [["LlamaForCausalLM"]]
    elif how in ("truncated", "garbled"):
        weights = bad / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3] if how == "truncated" else data[:8] + b"{not json" + data[17:])
        return bad
    else:
        cfg = how
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


async def test_half_copied_model_directories_are_listed_with_their_problem_and_refused_by_name(app, tiny_model):
    _, server = app
    broken = {name: _break(tiny_model, name, how) for name, how in {**BROKEN_CONFIGS, "truncated": "truncated",
                                                                     "garbled": "garbled"}.items()}  # fmt: skip
    async with Client(server) as client:
        listed = await call(client, "list_models")
        assert not listed.is_error, listed.content[0].text
        local = {Path(c["path"]).name: c for c in listed.structured_content["local"]}
        assert local["tiny"].get("model") and local["tiny"]["model"]["methods"]
        for name in broken:
            assert local[name].get("problem"), (name, local[name])
        for name in broken:
            one = await call(client, "list_models", model=f"models/{name}")
            assert one.is_error and "Error executing tool" not in one.content[0].text.split(":", 1)[1], name
            start = await call(client, "start_finetune", model=f"models/{name}", method="lora",
                               dataset="data/none.jsonl", dry_run=True)  # fmt: skip
            assert start.is_error and f"models/{name}" in start.content[0].text, name
        assert not (await call(client, "list_models", fits=True, method="lora")).is_error


# --- 6. sampling memory is bounded by design ----------------------------------------------------------------

LOGPROB_PROBE = """
import json, resource, sys
from llm_mcp.inference.sampling import SampleParams, TransformersSampler
from llm_mcp.inference.targets import Target
sampler = TransformersSampler()
target = Target(base_path=sys.argv[1], base_id="big-vocab")
sampler.generate(target, SampleParams(prompt="The cat", max_tokens=2))  # loaded; the peak so far is the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = sampler.generate(target, SampleParams(prompt="The cat", max_tokens=int(sys.argv[2]), temperature=1.0, n=16,
                                            seed=0, logprobs=True))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"grown_mb": grown / 1024, "tokens": [c.completion_tokens for c in out.completions],
                  "logprobs": [len(c.logprobs or []) for c in out.completions]}))
"""


def test_logprobs_memory_does_not_grow_with_the_tokens_generated(tmp_path):
    """16 completions over a 151,936-token vocabulary: full per-step scores would add ~9.7 MB a token, so 300
    more tokens would add ~2.9 GB; the sampler keeps one number per token."""
    from llm_mcp.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "big-vocab", hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                            model_vocab_size=151_936)  # fmt: skip
    runs = {}
    # A fixed mmap threshold: glibc otherwise raises it as big blocks are freed, and the 10 MB score buffers each
    # step allocates and frees then fragment the heap, a peak that is the allocator's, not memory kept.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    for tokens in ("60", "360"):
        out = subprocess.run([sys.executable, "-c", LOGPROB_PROBE, str(model), tokens], capture_output=True, text=True,
                             timeout=600, env=env)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        runs[tokens] = json.loads(out.stdout.strip().splitlines()[-1])
        assert runs[tokens]["logprobs"] == runs[tokens]["tokens"]
    assert runs["360"]["grown_mb"] - runs["60"]["grown_mb"] < 300, runs


async def test_greedy_logprobs_are_the_models_own_log_probabilities(app, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from llm_mcp.modeling.encode import tokenizer_for

    _, server = app
    async with Client(server) as client:
        r = await call(client, "sample", model="models/tiny", prompt="The cat", max_tokens=12, logprobs=True)
    completion = r.structured_content["completions"][0]
    tok = tokenizer_for(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = tok("The cat", add_special_tokens=True)["input_ids"]
    ids = torch.tensor([prompt])
    expected = []
    with torch.no_grad():
        for _ in completion["logprobs"]:
            logits = model(input_ids=ids).logits[0, -1]
            token = int(logits.argmax())
            expected.append(float(torch.log_softmax(logits.float(), -1)[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    got = [lp["logprob"] for lp in completion["logprobs"]]
    assert got == pytest.approx(expected, abs=1e-4)


# --- 7. one time limit per sample call, however many generations ----------------------------------------


async def test_compare_base_shares_the_calls_time_limit(two_jobs):
    home, ids = two_jobs
    state, server = served(home, sample_timeout_s=0.5)
    async with Client(server) as client:
        warm = await call(client, "sample", job_id=ids["lora"], prompt="warm", max_tokens=1)  # loads outside the budget
        assert not warm.is_error, warm.content[0].text
        # 16 sampled completions of up to 2000 tokens: generation runs until the slowest ends, past the deadline
        r = await call(client, "sample", job_id=ids["lora"], prompt="The cat", max_tokens=2000, temperature=1.0,
                       n=16, seed=1, compare_base=True)  # fmt: skip
        assert not r.is_error, r.content[0].text
        tuned, base = r.structured_content["completions"], r.structured_content["base_completions"]
        assert any(c["finish_reason"] == "time_limit" for c in tuned), tuned
        # the base model's generation starts past the call's deadline: it stops at once instead of taking its own
        assert all(c["completion_tokens"] <= 2 for c in base), [c["completion_tokens"] for c in base]
    state.shutdown()


# --- 8. a malformed result.json fails that job and the queue goes on ------------------------------------


def _dead_pid() -> tuple[int, float]:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


async def test_a_malformed_result_fails_its_job_with_the_cause_and_the_next_job_starts(app, home, tiny_model, dataset):
    state, server = app
    async with Client(server) as client:
        args = dict(model="models/tiny", method="lora", dataset="data/train.jsonl", max_steps=100_000, batch_size=2,
                    max_seq_len=64, checkpoint_every=0)  # fmt: skip
        first = (await call(client, "start_finetune", **args)).structured_content["job_id"]
        second = (await call(client, "start_finetune", **args)).structured_content["job_id"]
        assert state.store.get(second).state == "queued"
        job = state.store.get(first)
        deadline = time.monotonic() + 60
        while job.pid is None and time.monotonic() < deadline:
            await anyio.sleep(0.2)
            job = state.store.get(first)
        os.killpg(job.pid, signal.SIGKILL)  # the supervisor and its trainer gone, as after kill -9 of the group
        (state.store.job_dir(first) / "result.json").write_text('["done"]')
        deadline = time.monotonic() + 30
        while state.store.get(first).state == "running" and time.monotonic() < deadline:
            state.executor.poll()
            await anyio.sleep(0.5)
        failed = state.store.get(first)
        assert failed.state == "failed" and "result.json holds a list" in (failed.error or ""), failed.error
        assert state.store.get(second).state == "running"
        await call(client, "cancel_job", job_id=second)
        assert (await wait_final(client, second, timeout=120))["state"] == "cancelled"


def test_a_log_window_without_its_traceback_header_shows_no_source_lines(home):
    from llm_mcp.core.jobdir import public_log

    window = [
        '  File "/usr/lib/python3/site-packages/x.py", line 12, in run',
        "    config = JobConfig.read(job_dir)",
        "             ^^^^^^^^^^^^^^^^^^^^^^^",
        "llm_mcp.core.errors.ConfigurationError: config.json is not a valid job config",
    ]
    assert public_log(window, home) == [window[-1]]


def test_a_damaged_or_missing_job_store_is_rebuilt_from_the_job_directories(tmp_path, tiny_model_template):
    from llm_mcp.core.settings import Settings, data_path
    from llm_mcp.server import AppState

    train = {"model": "models/tiny", "dataset": "data/train.jsonl", "max_steps": 2, "batch_size": 2,
             "max_seq_len": 64, "checkpoint_every": 0}  # fmt: skip
    home, ids = trained_home(tmp_path, tiny_model_template, train, ("lora", "dora"))
    (home / "jobs" / "ft-junk").mkdir()
    (home / "jobs" / "ft-junk" / "config.json").write_text("[1, 2]")
    db = home / "jobs.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.write_bytes(db.read_bytes()[:1500])  # truncated mid-file
    settings = Settings(home=home, models_path=data_path("models.yaml"), sampler="transformers")
    state = AppState.load(settings)
    recovered = {j.id: j for j in state.store.list()}
    assert set(ids.values()) <= set(recovered) and all(recovered[i].state == "succeeded" for i in ids.values())
    assert any(p.name.startswith("jobs.db.damaged-") for p in home.iterdir())
    assert any("ft-junk: not recovered" in n for n in state.store.recovery_notes), state.store.recovery_notes
    db.unlink()
    for extra in home.glob("jobs.db-*"):
        extra.unlink()
    state = AppState.load(settings)
    assert set(ids.values()) <= {j.id for j in state.store.list()}
    fresh = tmp_path / "fresh"  # a new state directory is not a damaged one
    fresh.mkdir()
    assert JobStore(fresh, recover=True).recovery_notes == []
    assert not [p for p in fresh.iterdir() if "damaged" in p.name]


# --- 9. a full disk during training: the cause says so, nothing half-written is left ---------------------


@pytest.mark.slow
async def test_a_full_disk_during_training_is_the_recorded_cause_and_the_job_resumes(app, home, tiny_model, dataset):
    _, server = app
    with small_disk(home / "jobs", "16m") as jobs:
        async with Client(server) as client:
            args = dict(model="models/tiny", method="lora", dataset="data/train.jsonl", max_steps=400, batch_size=2,
                        max_seq_len=64, checkpoint_every=5)  # fmt: skip
            job_id = (await call(client, "start_finetune", **args)).structured_content["job_id"]
            job_dir = jobs / job_id
            deadline = time.monotonic() + 120
            while not list((job_dir / "checkpoints").glob("step-*[0-9]")) and time.monotonic() < deadline:
                await anyio.sleep(0.2)
            filler = fill(jobs, leave=0)
            ended = await wait_final(client, job_id, timeout=180)
            assert ended["state"] == "failed", ended
            assert ended["error"].startswith("No space left on device (") and "MB free in" in ended["error"], ended
            assert not list(job_dir.rglob("*.tmp")) and not (job_dir / "result.json.tmp").exists()
            filler.unlink()
            resumed = await call(client, "start_finetune", **args, resume_from=job_id)
            assert not resumed.is_error, resumed.content[0].text
            done = await wait_final(client, resumed.structured_content["job_id"], timeout=300)
            assert done["state"] == "succeeded", done
