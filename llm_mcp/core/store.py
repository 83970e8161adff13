"""Durable job records: SQLite (WAL) in LLM_MCP_HOME/jobs.db plus one directory per job.

Every state change is a conditional UPDATE (`... WHERE state = ?`), so two processes that race
(two servers, a server and a supervisor) cannot both move the same job.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import ConfigurationError, InvalidArgumentError, LlmMcpError
from llm_mcp.core.jobconfig import EvalConfig, JobConfig, parse_config

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    device_set TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pid INTEGER,
    pid_started_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resumed_from TEXT,
    exit_code INTEGER,
    error TEXT,
    next_step TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    config TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
"""
# Columns added after the first release: (name, declaration). Opening an older jobs.db adds them.
_ADDED_COLUMNS = (
    ("engine", "TEXT NOT NULL DEFAULT 'local'"),  # the executor that runs the job: local | slurm | ray
    ("engine_id", "TEXT"),  # the engine's id for it (Slurm job id, Ray submission id)
    ("engine_state", "TEXT"),  # the engine's last word on it (PENDING (Resources), RUNNING, ...)
    ("nodes", "TEXT"),  # the hosts it runs on, as the engine names them
    ("cancel_at", "REAL"),  # when cancel_job asked a cluster job to stop
)


class JobNotFoundError(LlmMcpError, LookupError):
    """No job with that id."""


@dataclass
class Job:
    id: str
    name: str
    state: str
    model: str
    method: str
    device_set: str
    created_at: float
    config: JobConfig | EvalConfig
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    pid_started_at: float | None = None
    cancel_requested: bool = False
    resumed_from: str | None = None
    exit_code: int | None = None
    error: str | None = None
    next_step: str | None = None
    warnings: list[str] = field(default_factory=list)
    engine: str = "local"
    engine_id: str | None = None
    engine_state: str | None = None
    nodes: str | None = None
    cancel_at: float | None = None

    @property
    def training(self) -> JobConfig:
        """The config of a training job.

        Raises:
            InvalidArgumentError: this job is an evaluation (it trained nothing).
        """
        if not isinstance(self.config, JobConfig):
            raise InvalidArgumentError(f"job {self.id} is an evaluation and has no adapter; give a training job")
        return self.config

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["config"] = parse_config(json.loads(d["config"]), f"job {d['id']}'s config")
        d["warnings"] = json.loads(d["warnings"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


def new_job_id() -> str:
    return time.strftime("ft-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


class JobStore:
    """Thin access layer over jobs.db. Safe to use from several processes at once.

    `busy_timeout_s` bounds how long a call waits for another process's write lock. With `recover` (the server
    at start-up) a jobs.db that is missing while job directories exist, or damaged, is rebuilt from the job
    directories, the source of truth for what exists; a damaged file is kept beside it, and what could not be
    recovered is in `recovery_notes`.
    """

    def __init__(self, home: Path, *, busy_timeout_s: float = 30.0, recover: bool = False):
        self.home = home
        self.jobs_dir = home / "jobs"
        self.busy_timeout_s = busy_timeout_s
        self.recovery_notes: list[str] = []
        path = home / "jobs.db"
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            gone = not path.exists() or path.stat().st_size == 0
            lost = recover and gone and any(p.is_dir() for p in self.jobs_dir.iterdir())
            if recover and not gone and not self._healthy():
                lost = True
                aside = path.with_name(f"jobs.db.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                for suffix in ("", "-wal", "-shm"):
                    if Path(f"{path}{suffix}").exists():
                        Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
                self.recovery_notes.append(f"jobs.db was damaged: kept as {aside.name}, rebuilt from jobs/")
            self._create()
            if lost:
                self.recovery_notes += rebuild(self)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(
                f"cannot use the job store in {home} ({exc}); check that LLM_MCP_HOME is writable and not full"
            ) from exc

    def _create(self) -> None:
        with self._connect() as db:
            db.executescript(_SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, declaration in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")

    def _healthy(self) -> bool:
        """SQLite's quick check passes and the jobs table is there."""
        try:
            with self._connect() as db:
                ok = db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                return ok and db.execute("SELECT name FROM sqlite_master WHERE name = 'jobs'").fetchone() is not None
        except sqlite3.DatabaseError:
            return False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.home / "jobs.db", timeout=self.busy_timeout_s, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: one writer at a time across processes, for read-then-write decisions."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def insert(self, job: Job) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, name, state, model, method, device_set, created_at, resumed_from, warnings,"
                " config, engine) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.name,
                    job.state,
                    job.model,
                    job.method,
                    job.device_set,
                    job.created_at,
                    job.resumed_from,
                    json.dumps(job.warnings),
                    job.config.model_dump_json(),
                    job.engine,
                ),
            )

    def get(self, job_id: str) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            recent = [j.id for j in self.list(limit=5)]
            raise JobNotFoundError(
                f"job_id={job_id!r} does not exist. Recent jobs: {recent or 'none'}. "
                "Call job_status without job_id to list jobs."
            )
        return Job.from_row(row)

    def list(self, limit: int = 20, states: tuple[str, ...] | None = None, engine: str | None = None) -> list[Job]:
        """The newest jobs, optionally only those in `states` and run by `engine`."""
        where, args = [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if engine:
            where.append("engine = ?")
            args.append(engine)
        query = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        query += " ORDER BY created_at DESC LIMIT ?"
        with self._connect() as db:
            return [Job.from_row(r) for r in db.execute(query, (*args, limit)).fetchall()]

    def count(self, states: tuple[str, ...]) -> int:
        with self._connect() as db:
            return db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state IN ({','.join('?' * len(states))})", states
            ).fetchone()[0]

    def update(self, job_id: str, *, expect: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set fields; with `expect`, only if the job is in one of those states. True if a row changed."""
        if "warnings" in fields:
            fields["warnings"] = json.dumps(fields["warnings"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        query, args = f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id]
        if expect:
            query += f" AND state IN ({','.join('?' * len(expect))})"
            args += list(expect)
        with self._connect() as db:
            return db.execute(query, args).rowcount == 1


def rebuild(store: JobStore) -> list[str]:
    """Insert a record for every job directory jobs.db lacks, from its config.json and result.json. A job that
    had not ended is recorded failed (its processes cannot be told apart from a dead job's); its checkpoints
    stay and resume_from continues it. Returns notes on what was recovered and what could not be."""
    notes, recovered = [], 0
    have = {j.id for j in store.list(limit=1_000_000)}
    for job_dir in sorted(p for p in store.jobs_dir.iterdir() if p.is_dir()):
        if job_dir.name in have:
            continue
        try:
            config = parse_config(json.loads((job_dir / "config.json").read_text()), f"{job_dir}/config.json")
            result = json.loads((job_dir / "result.json").read_text()) if (job_dir / "result.json").exists() else {}
        except (OSError, ValueError, LlmMcpError) as exc:
            notes.append(f"{job_dir.name}: not recovered ({exc}); its files are untouched")
            continue
        result = result if isinstance(result, dict) else {}
        ended = result.get("state") in FINAL_STATES
        created = (job_dir / "config.json").stat().st_mtime
        job = Job(
            id=job_dir.name,
            name=str(config.request.get("name") or job_dir.name) if isinstance(config, JobConfig) else job_dir.name,
            state=result["state"] if ended else "failed",
            model=config.model.id,
            method=config.method,
            device_set=config.device,
            created_at=created,
            config=config,
            warnings=["recovered from its directory: jobs.db was missing or damaged"],
        )
        store.insert(job)
        store.update(
            job.id,
            finished_at=created,
            error=result.get("error") if ended else "its record was lost with jobs.db; it did not finish",
            next_step=result.get("next_step")
            if ended
            else f"resume_from='{job.id}' continues it if it has checkpoints",
        )
        recovered += 1
    return [f"jobs.db rebuilt: {recovered} job(s) recovered from jobs/", *notes]
