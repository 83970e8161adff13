"""Faults, bad input and load: nothing lost, nobody let in (`pytest -m reliability`).

Other reliability tests live next to what they test: argument fuzzing (test_fuzz.py), killing
the trainer and two servers on one state dir (test_jobs.py), HTTP auth and DNS-rebinding
(test_server.py), path confinement (test_models_local.py, test_sample_export.py).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import anyio
import pytest
from mcp import Client

from llm_mcp.core.data import DataError, validate_dataset
from tests.conftest import RunningServer, free_port, processes_mentioning, server_env, wait_final

pytestmark = [pytest.mark.anyio, pytest.mark.reliability]
JOB = {
    "model": "models/tiny",
    "method": "lora",
    "dataset": "data/train.jsonl",
    "learning_rate": 5e-3,
    "max_seq_len": 64,
    "lora_dropout": 0.0,
}


# --- bad datasets ----------------------------------------------------------------------------------


def test_a_1gb_dataset_is_streamed_in_bounded_memory(tmp_path):
    """1,000 good rows, then 1 GB without a newline (a sparse file): a line-numbered error, < 64 MB held."""
    path = tmp_path / "huge.jsonl"
    row = json.dumps({"prompt": "Q: 1 plus 1? A:", "completion": " 2"}) + "\n"
    with open(path, "w") as fh:
        fh.writelines(row for _ in range(1000))
    os.truncate(path, 1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            validate_dataset(path, time_budget_s=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "line 1001" in str(err.value) and "longer than 16 MB" in str(err.value)
    assert peak < 64 << 20, f"peak {peak >> 20} MB"


def test_huge_json_and_csv_fields_are_clear_errors(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "w") as fh:
        fh.write("[")
        os.truncate(big, 300 << 20)
    with pytest.raises(DataError, match="Convert it to JSONL"):
        validate_dataset(big)
    csv_path = tmp_path / "wide.csv"
    csv_path.write_text("prompt,completion\n" + "x" * (17 << 20) + ",y\n")
    with pytest.raises(DataError, match="line 2: malformed CSV"):
        validate_dataset(csv_path)


async def test_special_files_and_links_out_are_refused(app, tiny_model, dataset):
    state, server = app
    home = state.settings.home
    os.mkfifo(home / "data" / "fifo.jsonl")
    (home / "data" / "passwd.jsonl").symlink_to("/etc/passwd")
    cases = {
        "data/fifo.jsonl": "not a regular file",
        "data/passwd.jsonl": "outside the allowed roots",
        "/dev/zero": "outside the allowed roots",
        "../../etc/passwd": "outside the allowed roots",
    }
    async with Client(server) as client:
        for path, message in cases.items():
            with anyio.fail_after(10):  # a FIFO must not be opened (it would block)
                r = await client.call_tool("start_finetune", {**JOB, "dataset": path, "max_steps": 2})
            assert r.is_error and message in r.content[0].text, (path, r.content[0].text)
    assert state.store.list() == []


# --- faults ----------------------------------------------------------------------------------------


def test_an_unusable_state_dir_stops_start_up_with_a_clear_error(tmp_path):
    for home, why in (
        (Path("/proc/llm-mcp-state"), "cannot create the state directory"),
        (tmp_path / "a-file", "cannot create the state directory"),
    ):
        if home.parent == tmp_path:
            home.write_text("x")
        proc = subprocess.run(
            [sys.executable, "-m", "llm_mcp", "serve"],
            env=server_env(home),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert proc.returncode == 2 and why in proc.stderr and "LLM_MCP_HOME" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
async def test_a_full_disk_is_a_clear_error_and_leaves_the_store_intact(home, tiny_model, dataset):
    """RLIMIT_FSIZE (set on the running server) makes every write past 2 KB fail, as a full disk would."""
    env = server_env(home)
    server = RunningServer(["--transport", "streamable-http"], env, free_port())
    try:
        async with Client(f"{server.url}/mcp") as client:
            first = (await client.call_tool("start_finetune", {**JOB, "max_steps": 3})).structured_content["job_id"]
            await wait_final(client, first)
        jobs_before = sorted(p.name for p in (home / "jobs").iterdir())
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))  # disk "full"
        async with Client(f"{server.url}/mcp") as client:
            r = await client.call_tool("start_finetune", {**JOB, "max_steps": 3})
            assert r.is_error and "could not read or write the state directory" in r.content[0].text, r.content[0].text
            assert "Traceback" not in r.content[0].text and "LLM_MCP_HOME" in r.content[0].text
            status = await client.call_tool("job_status", {"job_id": first})  # SQLite may need to write to read
            assert not status.is_error or "could not read or write the state directory" in status.content[0].text
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            status = await client.call_tool("job_status", {"job_id": first})  # space again: the same server recovers
            assert not status.is_error and status.structured_content["job"]["state"] == "succeeded"
        assert server.proc.poll() is None  # still serving
    finally:
        server.stop()
    assert sorted(p.name for p in (home / "jobs").iterdir()) == jobs_before  # no half-created job
    with sqlite3.connect(home / "jobs.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [r[0] for r in db.execute("SELECT id FROM jobs")] == [first]


@pytest.mark.slow
async def test_killing_the_server_20_times_loses_nothing(home, tiny_model, dataset):
    env = server_env(home)
    started: list[str] = []
    for i in range(20):
        server = RunningServer(["--transport", "streamable-http"], env, free_port())
        try:
            async with Client(f"{server.url}/mcp") as client:
                if i % 5 == 0:  # a new job every 5th round; they queue behind each other
                    r = await client.call_tool("start_finetune", {**JOB, "max_steps": 60, "checkpoint_every": 10})
                    assert not r.is_error, r.content[0].text
                    started.append(r.structured_content["job_id"])
                listed = (await client.call_tool("job_status", {})).structured_content["jobs"]
                assert sorted(j["job_id"] for j in listed) == sorted(started)
                assert all(j["state"] in ("queued", "running", "succeeded") for j in listed), listed
        finally:
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
        await anyio.sleep(0.5)
    server = RunningServer(["--transport", "streamable-http"], env, free_port())
    try:
        async with Client(f"{server.url}/mcp") as client:
            for job_id in started:
                await wait_final(client, job_id, timeout=300)
            for job_id in started:
                job = (await client.call_tool("job_status", {"job_id": job_id})).structured_content["job"]
                assert job["state"] == "succeeded" and job["step"] == 60, job
                assert (home / "jobs" / job_id / "adapter" / "adapter_model.safetensors").exists()
                assert len(list((home / "jobs" / job_id / "checkpoints").glob("step-*"))) >= 1
                assert processes_mentioning(str(home / "jobs" / job_id)) == []
    finally:
        server.stop()


# --- resources and load ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_cancelled_and_finished_jobs_leave_no_processes(app, tiny_model, dataset):
    state, server = app
    async with Client(server) as client:
        done = (await client.call_tool("start_finetune", {**JOB, "max_steps": 3})).structured_content["job_id"]
        await wait_final(client, done)
        running = (await client.call_tool("start_finetune", {**JOB, "max_steps": 5000})).structured_content["job_id"]
        while (await client.call_tool("job_status", {"job_id": running, "wait_seconds": 5})).structured_content["job"][
            "step"
        ] < 2:
            pass
        assert processes_mentioning(str(state.store.job_dir(running)))  # it is running now
        await client.call_tool("cancel_job", {"job_id": running})
        await wait_final(client, running)
    assert state.store.get(done).state == "succeeded" and state.store.get(running).state == "cancelled"
    job_dirs = [str(state.store.job_dir(j)) for j in (done, running)]
    deadline = time.monotonic() + 10
    while any(processes_mentioning(d) for d in job_dirs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [processes_mentioning(d) for d in job_dirs] == [[], []]


async def test_sample_requests_beyond_capacity_are_refused_cleanly(app, tiny_model):
    _, server = app
    args = {"model": str(tiny_model), "prompt": "The cat", "max_tokens": 48}
    async with Client(server) as client:
        results = []

        async def one():
            results.append(await client.call_tool("sample", args))

        async with anyio.create_task_group() as tg:
            for _ in range(14):
                tg.start_soon(one)
        refused = [r for r in results if r.is_error]
        served = [r for r in results if not r.is_error]
        assert len(served) >= 8 and refused, [r.content[0].text[:80] for r in results]
        assert all("the sampler is busy" in r.content[0].text and "try again" in r.content[0].text for r in refused)
        after = await client.call_tool("sample", args)  # the sampler still works
        assert not after.is_error and after.structured_content["completions"][0]["completion_tokens"] > 0


@pytest.mark.slow
async def test_50_concurrent_http_clients_while_a_job_trains(home, tiny_model, dataset, capsys):
    """50 MCP sessions over streamable HTTP (a lean protocol client: the SDK client's per-result schema
    validation would make 50 of them in this process the bottleneck), list_models / job_status. The load
    generator is `python -m llm_mcp.bench.server load` in its own process; this test only reads its JSON."""
    server = RunningServer(["--transport", "streamable-http"], server_env(home), free_port())
    try:
        async with Client(f"{server.url}/mcp") as client:
            job_id = (await client.call_tool("start_finetune", {**JOB, "max_steps": 5000})).structured_content["job_id"]
            while (await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 5})).structured_content[
                "job"
            ]["step"] < 1:
                pass
            load = await _load(f"{server.url}/mcp", job_id, server_env(home), clients=50, calls=10, think_s=1.0)
            state = (await client.call_tool("job_status", {"job_id": job_id})).structured_content["job"]["state"]
            await client.call_tool("cancel_job", {"job_id": job_id})
    finally:
        server.stop()
    assert load["errors"] == 0 and state == "running", load
    with capsys.disabled():
        print(
            f"\n50 HTTP clients x 10 calls (think 0.5-1.5 s) while a job trains: p50 {load['all_p50_ms']} ms, "
            f"p95 {load['all_p95_ms']} ms (list_models {load['list_models_p95_ms']}, job_status "
            f"{load['job_status_p95_ms']})"
        )


async def _load(url: str, job_id: str, env: dict[str, str], clients: int, calls: int, think_s: float) -> dict:
    """Run the load generator as a subprocess (the event loop stays free for this test's open session)."""
    with anyio.fail_after(300):
        proc = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "llm_mcp.bench.server",
                "load",
                url,
                job_id,
                "--clients",
                str(clients),
                "--calls",
                str(calls),
                "--think-s",
                str(think_s),
            ],
            env=env,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])
