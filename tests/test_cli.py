"""The `llm-mcp` command line: `jobs` (state dir, empty list, cancel, follow redraw) and quiet broken pipes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.store import Job, JobStore
from tests.conftest import server_env

CONFIG = {
    "model": {"id": "tiny", "path": "/unused"},
    "method": "lora",
    "dataset": "unused.jsonl",
    "learning_rate": 1e-3,
    "batch_size": 1,
    "gradient_accumulation": 1,
    "max_seq_len": 64,
    "checkpoint_every": 0,
    "keep_checkpoints": 1,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "lora": {"rank": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}


def llm_mcp(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_mcp", *args], env=server_env(home), capture_output=True, text=True, timeout=120
    )


def insert_job(store: JobStore, job_id: str, state: str, **fields) -> None:
    config = JobConfig.parse({**CONFIG, "job_id": job_id})
    store.insert(
        Job(
            id=job_id,
            name=job_id,
            state=state,
            model="tiny",
            method="lora",
            device_set="cpu",
            created_at=time.time(),
            config=config,
            **fields,
        )
    )


def test_jobs_names_its_state_dir_and_says_when_there_are_none(home, tmp_path):
    r = llm_mcp(home, "jobs")
    assert r.returncode == 0, r.stderr
    assert f"jobs in {home} (from LLM_MCP_HOME)" in r.stderr.splitlines()
    assert f"No jobs in {home}" in r.stdout and "--home" in r.stdout and "LLM_MCP_HOME" in r.stdout

    other = tmp_path / "other"
    JobStore(other)  # a state dir with an (empty) job store
    r = llm_mcp(home, "jobs", "--home", str(other))
    assert r.returncode == 0, r.stderr
    assert f"jobs in {other} (from --home)" in r.stderr.splitlines()
    assert f"No jobs in {other}" in r.stdout

    insert_job(JobStore(home), "ft-done", "succeeded")
    r = llm_mcp(home, "jobs")
    assert f"jobs in {home} (from LLM_MCP_HOME)" in r.stderr.splitlines()
    assert "ft-done" in r.stdout and "No jobs" not in r.stdout


def test_cancel_says_what_happened(home):
    store = JobStore(home)
    insert_job(store, "ft-failed", "failed", finished_at=time.time(), error="boom")
    # A running job with no process yet (claimed moments ago) holds the one slot, so the queued one stays queued
    # and cancelling the running one starts no process and signals none.
    insert_job(store, "ft-running", "running", started_at=time.time())
    insert_job(store, "ft-queued", "queued")

    r = llm_mcp(home, "jobs", "ft-failed", "--cancel")
    assert "ft-failed already ended failed; nothing to do" in r.stdout, r.stdout + r.stderr

    r = llm_mcp(home, "jobs", "ft-queued", "--cancel")
    assert r.returncode == 0, r.stderr
    assert "ft-queued was queued: removed from the queue" in r.stdout, r.stdout + r.stderr
    assert store.get("ft-queued").state == "cancelled"

    r = llm_mcp(home, "jobs", "ft-running", "--cancel")
    assert r.returncode == 0, r.stderr
    assert "cancel requested for ft-running: it checkpoints at the next step" in r.stdout, r.stdout + r.stderr
    assert store.get("ft-running").cancel_requested


def screen(writes: list[str], width: int) -> list[str]:
    """The rows a terminal `width` columns wide shows after `writes` (CR, ESC[K and autowrap; nothing else)."""
    rows, row, col = [[]], 0, 0
    for text in writes:
        i = 0
        while i < len(text):
            if text.startswith("\033[K", i):
                del rows[row][col:]
                i += 3
                continue
            ch = text[i]
            i += 1
            if ch == "\r":
                col = 0
                continue
            if col == width:  # autowrap to a new row
                rows.append([])
                row, col = row + 1, 0
            line = rows[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    return ["".join(r) for r in rows]


def test_follow_redraw_leaves_nothing_of_the_previous_line():
    from llm_mcp.cli import redraw

    long = "ft-1 running   [#####-----] 50/100 loss 1.2345 9,999 tok/s ETA 60s"
    short = "ft-1 running   [######----] 60/100 loss 1.2 ETA 6s"
    assert screen([redraw(long, 100), redraw(short, 100)], 100) == [short]
    # A line wider than the terminal would wrap, and "\r" only returns to the start of the last row: cut it.
    assert screen([redraw(long, 40), redraw(short, 40)], 40) == [short[:39]]


def test_broken_pipe_is_quiet(home):
    # The reader is gone before the first write: deterministic EPIPE.
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_mcp", "models"],
        env=server_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode in (0, 141)

    r = subprocess.run(
        f"'{sys.executable}' -m llm_mcp models | head -1",
        shell=True,
        env=server_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.stdout.count("\n") == 1
