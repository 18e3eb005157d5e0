"""A training job's record, its states, and the SQLite store of jobs and their events.

    validating -> queued -> running -> succeeded | failed | cancelled

STATES is the one list of job states: the service's enum, the metrics' labels and the
manager's checks all read it. Jobs and events survive a restart of the server.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from adapterd.training.spec import TrainingSpec

STATES = ("validating", "queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("validating", "queued", "running")  # not finished: what a tenant's job limit counts
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    state: str
    spec: TrainingSpec  # what the job asks for, name included: stored once, as JSON
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    adapter: str = ""  # "name@N" once published
    step: int = 0
    total_steps: int = 0
    loss: float | None = None  # the last reported training loss
    train_examples: int = 0
    validation_examples: int = 0
    retention_examples: int = 0
    training: dict = field(default_factory=dict)  # the worker's run statistics
    evaluation: dict = field(default_factory=dict)  # evaluate.compare()'s results

    @property
    def name(self) -> str:
        """The adapter's name in the registry: the job publishes its next version."""
        return self.spec.name


@dataclass(frozen=True)
class Event:
    job_id: str
    seq: int  # 1, 2, ... per job
    time: float
    type: str  # state, message, started, step, eval, evaluation
    data: dict

    @property
    def terminal(self) -> bool:
        return self.type == "state" and self.data.get("state") in TERMINAL


_JSON_COLUMNS = ("spec", "training", "evaluation")
_COLUMNS = tuple(f.name for f in fields(Job))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL,
    spec TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    error TEXT NOT NULL DEFAULT '', adapter TEXT NOT NULL DEFAULT '',
    step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, loss REAL,
    train_examples INTEGER NOT NULL DEFAULT 0, validation_examples INTEGER NOT NULL DEFAULT 0,
    retention_examples INTEGER NOT NULL DEFAULT 0,
    training TEXT NOT NULL DEFAULT '{}', evaluation TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, type TEXT NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (job_id, seq)
);
"""


class JobStore:
    """Jobs and their events in one SQLite file, shared by the RPC threads and the runner
    under one lock. Event listeners are called under that lock, in seq order."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        # A store written before the name was read from the spec kept it in a column too.
        if "name" in {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}:
            self._db.execute("ALTER TABLE jobs DROP COLUMN name")
        self._lock = threading.RLock()
        self._listeners: dict[str, list[Callable[[Event], None]]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, job: Job) -> None:
        row = _to_row({c: getattr(job, c) for c in _COLUMNS})
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )

    def update(self, job_id: str, *, only_from: Iterable[str] | None = None, **fields) -> bool:
        """Set `fields`; with `only_from`, only while the job is in one of those states
        (a state change that lost a race changes nothing). True if the row changed."""
        row = _to_row(fields)
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in row)} WHERE id = ?"
        args = [*row.values(), job_id]
        if only_from is not None:
            states = list(only_from)
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += states
        with self._lock:
            return self._db.execute(sql, args).rowcount == 1

    def set_state(self, job_id: str, state: str, *, from_states: Iterable[str], message: str = "",
                  **fields) -> bool:
        """Move the job to `state` if it is in one of `from_states`, and record the change
        as a "state" event in the same step, as watchers see it. False if it was not."""
        now = time.time()
        if state == "running":
            fields["started_at"] = now
        if state in TERMINAL:
            fields["finished_at"] = now
        with self._lock:
            if not self.update(job_id, only_from=from_states, state=state, **fields):
                return False
            event = {"state": state}
            if message or fields.get("error"):
                event["message"] = message or fields["error"]
            self.add_event(job_id, "state", event, at=now)
        return True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _from_row(row) if row else None

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def list(self, tenant: str, *, limit: int, before: tuple[float, str] | None = None,
             states: Iterable[str] = ()) -> list[Job]:
        """A tenant's jobs, newest first, starting after the (created_at, id) cursor."""
        sql, args = "SELECT * FROM jobs WHERE tenant = ?", [tenant]
        if before is not None:
            sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [before[0], before[0], before[1]]
        states = list(states)
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += states
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self._lock:
            return [_from_row(r) for r in self._db.execute(sql, [*args, limit])]

    def count_by_state(self, tenant: str | None = None) -> dict[str, int]:
        """How many jobs are in each state (that has any), of one tenant or of all."""
        sql, args = "SELECT state, COUNT(*) FROM jobs", []
        if tenant is not None:
            sql, args = sql + " WHERE tenant = ?", [tenant]
        with self._lock:
            return dict(self._db.execute(sql + " GROUP BY state", args).fetchall())

    def in_state(self, state: str) -> list[Job]:
        """Every tenant's jobs in `state`, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created_at, id", (state,)).fetchall()
        return [_from_row(r) for r in rows]

    def add_event(self, job_id: str, type_: str, data: dict, at: float | None = None) -> Event:
        with self._lock:
            (last,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()
            event = Event(job_id, last + 1, at if at is not None else time.time(), type_, data)
            self._db.execute(
                "INSERT INTO events (job_id, seq, time, type, data) VALUES (?, ?, ?, ?, ?)",
                (job_id, event.seq, event.time, type_, json.dumps(data)),
            )
            for listener in self._listeners.get(job_id, ()):
                listener(event)
        return event

    def events(self, job_id: str, after_seq: int = 0) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after_seq)
            ).fetchall()
        return [Event(r["job_id"], r["seq"], r["time"], r["type"], json.loads(r["data"])) for r in rows]

    def subscribe(self, job_id: str, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call `listener(event)` for each new event of the job; returns the unsubscribe."""
        with self._lock:
            self._listeners.setdefault(job_id, []).append(listener)

        def unsubscribe() -> None:
            with self._lock:
                listeners = self._listeners.get(job_id, [])
                if listener in listeners:
                    listeners.remove(listener)
                if not listeners:
                    self._listeners.pop(job_id, None)

        return unsubscribe


def _to_row(fields: dict) -> dict:
    row = {}
    for k, v in fields.items():
        if k == "spec":
            v = v.to_json()
        elif k in _JSON_COLUMNS:
            v = json.dumps(v)
        row[k] = v
    return row


def _from_row(row: sqlite3.Row) -> Job:
    values = {k: row[k] for k in _COLUMNS}
    values["spec"] = TrainingSpec.from_json(values["spec"])
    for k in ("training", "evaluation"):
        values[k] = json.loads(values[k])
    return Job(**values)
