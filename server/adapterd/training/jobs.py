"""Training jobs: the SQLite store of jobs and their events, and the runner that gives each
job its own worker process.

    create()  -> validating -> queued -> running -> succeeded | failed | cancelled

`create` checks the whole dataset before anything is queued (data.py) and writes the
checked examples into the job's directory. A scheduler thread starts queued jobs, oldest
first, at most --max-concurrent-jobs at once; each running job has a thread that starts
`python -m adapterd.training.worker`, reads its events off a pipe into the store, and
settles the job when the worker exits: on success the adapter is published (the
registry's checks, the next version of the name), a crash or an OOM fails the job with the
reason, and inference never notices either. Cancelling a running job sends the worker
SIGTERM (it stops at the end of its step), then SIGKILL after a grace period.

Jobs and events survive a restart: a job found running at start-up was cut off with the
server and is failed with that reason; queued jobs run again. Every job belongs to a
tenant, and another tenant's job is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from adapterd_rules import quote

from adapterd.errors import InvalidArgument, NotFound
from adapterd.training import data
from adapterd.training.evaluate import flat_metrics
from adapterd.training.spec import ALL_LINEAR, TrainingSpec

log = logging.getLogger(__name__)

STATES = ("validating", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
LOG_TAIL_CHARS = 2000  # of the worker's own output, quoted when it dies without a word
MAX_PAGE_SIZE = 100  # ListJobs
DEFAULT_PAGE_SIZE = 20
MAX_SEQ = 2**63 - 1  # events' seq is an SQLite INTEGER (signed 64-bit)

# publish(tenant, name, adapter_dir, job_id=, description=, metrics=) -> "name@N"
Publish = Callable[..., str]


@dataclass(frozen=True)
class JobsConfig:
    """What the runner needs from the server's configuration (config.TrainingConfig)."""

    root: Path  # jobs.sqlite3 and one directory per job
    base_model: Path  # the served base model's directory: each worker loads its own copy
    device: str = "auto"
    compute_dtype: str = "auto"
    max_concurrent_jobs: int = 1
    max_dataset_bytes: int = 100 * 2**20
    worker_nice: int = 10  # on a shared CPU, inference goes first
    cancel_grace_s: float = 30.0
    max_rank: int | None = None  # the server's --max-rank: a larger adapter could not be served


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    name: str
    state: str
    spec: TrainingSpec
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
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
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
        self._lock = threading.RLock()
        self._listeners: dict[str, list[Callable[[Event], None]]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, job: Job) -> None:
        row = _to_row(job)
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )

    def update(self, job_id: str, *, only_from: Iterable[str] | None = None, **fields) -> bool:
        """Set `fields`; with `only_from`, only while the job is in one of those states
        (a state change that lost a race changes nothing). True if the row changed."""
        row = _to_row_fields(fields)
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


def _to_row_fields(fields: dict) -> dict:
    row = {}
    for k, v in fields.items():
        if k == "spec":
            v = v.to_json()
        elif k in _JSON_COLUMNS:
            v = json.dumps(v)
        row[k] = v
    return row


def _to_row(job: Job) -> dict:
    return _to_row_fields({f: getattr(job, f) for f in Job.__dataclass_fields__})


def _from_row(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["spec"] = TrainingSpec.from_json(values["spec"])
    for k in ("training", "evaluation"):
        values[k] = json.loads(values[k])
    return Job(**values)


class JobManager:
    """The jobs of every tenant: create, read, cancel, follow; and the runner."""

    def __init__(self, config: JobsConfig, *, publish: Publish, tokenizer=None, module_names: Iterable[str] = (),
                 metrics=None):
        """`tokenizer`: the base model's, to check example lengths (default: loaded from
        config.base_model at start); `module_names`: the base model's linear modules, to check
        --target-modules before a job is queued (or later, set_module_names); `metrics`: an
        adapterd.metrics.Metrics for jobs by state and the running jobs' loss."""
        self.config = config
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.publish = publish
        self.set_module_names(module_names)
        config.root.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(config.root / "jobs.sqlite3")
        self._cond = threading.Condition()
        self._running: dict[str, _Run] = {}
        self._closing = False
        self._scheduler: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def set_module_names(self, names: Iterable[str]) -> None:
        """The base model's linear modules ("model.layers.0.self_attn.q_proj", ...), e.g.
        the keys of ModelSpec.linear_shapes once the engine has loaded the model."""
        self.module_names = frozenset(n.rsplit(".", 1)[-1] for n in names)

    def start(self) -> JobManager:
        """Settle what a previous server left behind, then start the scheduler."""
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.config.base_model)
        for state, reason in (
            ("running", "the server stopped while this job was running; create the job again"),
            ("validating", "the server stopped while this job's data was being checked; create the job again"),
        ):
            for job in self.store.in_state(state):
                self._finish(job.id, "failed", error=reason)
        self._report_states()
        self._scheduler = threading.Thread(target=self._schedule, name="training-scheduler", daemon=True)
        self._scheduler.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop starting jobs; stop the running ones (they are failed: the server is going
        away), and wait for their workers to exit."""
        with self._cond:
            self._closing = True
            runs = list(self._running.values())
            self._cond.notify_all()
        for run in runs:
            run.stop("the server shut down while this job was running; create the job again")
        for run in runs:
            run.thread.join(timeout)
        if self._scheduler is not None:
            self._scheduler.join(timeout)
        self.store.close()

    def kill_workers(self) -> None:
        """SIGKILL every running worker (and what it started) at once, waiting for nothing:
        for a forced exit (a second SIGTERM), so that no worker outlives the server."""
        with self._cond:
            runs = list(self._running.values())
        for run in runs:
            proc = run.proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is its pid

    # ---- the API --------------------------------------------------------------------------

    def create(self, tenant: str, spec: TrainingSpec, training: bytes, validation: bytes | None = None,
               retention: bytes | None = None) -> Job:
        """Check the data (InvalidArgument naming the file and line) and queue the job. On
        any error nothing is queued and no job is left behind."""
        self._check_spec(spec)
        job = Job(id=f"ftjob-{secrets.token_hex(12)}", tenant=tenant, name=spec.name, state="validating",
                  spec=spec, created_at=time.time())
        self.store.insert(job)
        self.store.add_event(job.id, "state", {"state": "validating"})
        self._report_states()
        job_dir = self.job_dir(job.id)
        try:
            counts = self._prepare(job_dir, spec, training, validation, retention)
        except BaseException:
            self.store.delete(job.id)
            shutil.rmtree(job_dir, ignore_errors=True)
            self._report_states()
            raise
        if not self._transition(job.id, "queued", from_states=("validating",), **counts):
            return self.store.get(job.id)  # cancelled while validating
        with self._cond:
            self._cond.notify_all()
        return self.store.get(job.id)

    def get(self, tenant: str, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"no training job {quote(job_id)}; `adapterctl jobs list` shows yours")
        return job

    def list(self, tenant: str, *, page_size: int = 20, page_token: str = "",
             states: Iterable[str] = ()) -> tuple[list[Job], str]:
        """A page of the tenant's jobs, newest first, and the token of the next page ("" at the end).
        `page_size` 0 means DEFAULT_PAGE_SIZE; above MAX_PAGE_SIZE is refused, not cut."""
        page_size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be in 1..{MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE}); got {page_size}")
        for s in states:
            if s not in STATES:
                raise InvalidArgument(f"unknown job state {s!r}; one of {', '.join(STATES)}")
        before = None
        if page_token:
            try:
                at, job_id = page_token.split(":", 1)
                before = (float(at), job_id)
            except ValueError as e:
                raise InvalidArgument(f"page_token {quote(page_token)} is not one this server gave") from e
        jobs = self.store.list(tenant, limit=page_size + 1, before=before, states=states)
        more = len(jobs) > page_size
        jobs = jobs[:page_size]
        return jobs, (f"{jobs[-1].created_at!r}:{jobs[-1].id}" if more else "")

    def cancel(self, tenant: str, job_id: str) -> Job:
        """Cancel a job that has not finished; a finished job is returned as it is."""
        job = self.get(tenant, job_id)
        if self._transition(job_id, "cancelled", from_states=("validating", "queued"), error="cancelled by the user"):
            return self.store.get(job_id)
        with self._cond:
            run = self._running.get(job_id)
        if run is not None:
            run.cancel()
        return self.store.get(job_id) or job

    async def follow(self, tenant: str, job_id: str, after_seq: int = 0) -> AsyncIterator[Event]:
        """Every event after `after_seq` (0: from the start), then live ones, until the job
        reaches a final state; at once for a finished job with nothing after `after_seq`."""
        if not 0 <= after_seq <= MAX_SEQ:
            raise InvalidArgument(f"after_seq must be in 0..2^63-1 (a seq this server gave, or 0); got {after_seq}")
        self.get(tenant, job_id)
        loop = asyncio.get_running_loop()
        live: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: its watcher is gone
                loop.call_soon_threadsafe(live.put_nowait, event)

        unsubscribe = self.store.subscribe(job_id, on_event)  # before the replay: nothing falls between
        try:
            last = after_seq
            for event in self.store.events(job_id, after_seq):
                yield event
                last = event.seq
                if event.terminal:
                    return
            # The replay held no final event: the job is still going, or it finished at or
            # before after_seq. A finished job's final event is its last, written with its
            # state under the store's lock, so a final state here means nothing will follow.
            job = self.store.get(job_id)
            if job is None or job.state in TERMINAL:
                return
            while True:
                event = await live.get()
                if event.seq <= last:
                    continue
                yield event
                last = event.seq
                if event.terminal:
                    return
        finally:
            unsubscribe()

    def job_dir(self, job_id: str) -> Path:
        return self.config.root / job_id

    # ---- checks before queueing -----------------------------------------------------------

    def _check_spec(self, spec: TrainingSpec) -> None:
        if self.config.max_rank is not None and spec.rank > self.config.max_rank:
            raise InvalidArgument(
                f"--rank {spec.rank} is above this server's --max-rank {self.config.max_rank}: "
                "the adapter could not be served"
            )
        if spec.target_modules != (ALL_LINEAR,) and self.module_names:
            unknown = [m for m in spec.target_modules if m not in self.module_names]
            if unknown:
                raise InvalidArgument(
                    f"--target-modules: the base model has no linear module named {', '.join(unknown)}; "
                    f"it has {', '.join(sorted(self.module_names))}"
                )

    def _prepare(self, job_dir: Path, spec: TrainingSpec, training: bytes, validation: bytes | None,
                 retention: bytes | None) -> dict:
        def parse(raw: bytes, what: str) -> list[data.Example]:
            return data.parse_jsonl(raw, what=what, tokenizer=self.tokenizer, max_seq_len=spec.max_seq_len,
                                    max_bytes=self.config.max_dataset_bytes)

        train = parse(training, "training file")
        if validation is not None:
            val = parse(validation, "validation file")
        else:
            train, val = data.split_validation(train, spec.val_split, spec.seed)
        retain = parse(retention, "retention file") if retention is not None else []
        job_dir.mkdir(parents=True)
        for name, examples in (("train", train), ("validation", val), ("retention", retain)):
            data.write_examples(job_dir / f"{name}.jsonl", examples)
        return {"train_examples": len(train), "validation_examples": len(val), "retention_examples": len(retain)}

    # ---- state ----------------------------------------------------------------------------

    def active_jobs(self, tenant: str) -> int:
        """The tenant's jobs not yet finished: what its max_training_jobs limit counts."""
        counts = self.store.count_by_state(tenant)
        return sum(counts.get(s, 0) for s in ("validating", "queued", "running"))

    def _transition(self, job_id: str, state: str, *, from_states: Iterable[str], **fields) -> bool:
        changed = self.store.set_state(job_id, state, from_states=from_states, **fields)
        if changed:
            self._report_states()
            if state in TERMINAL and self.metrics is not None:
                self.metrics.training_finished(job_id)
        return changed

    def _report_states(self) -> None:
        if self.metrics is not None:
            self.metrics.set_training_jobs(self.store.count_by_state())

    def _finish(self, job_id: str, state: str, **fields) -> bool:
        return self._transition(job_id, state, from_states=("validating", "queued", "running"), **fields)

    # ---- the runner -----------------------------------------------------------------------

    def _schedule(self) -> None:
        while True:
            with self._cond:
                while not self._closing and (
                    len(self._running) >= self.config.max_concurrent_jobs or not self.store.in_state("queued")
                ):
                    self._cond.wait()
                if self._closing:
                    return
                job = self.store.in_state("queued")[0]
                if not self._transition(job.id, "running", from_states=("queued",)):
                    continue  # cancelled just now
                run = _Run(self, self.store.get(job.id))
                self._running[job.id] = run
            run.thread.start()

    def _run_finished(self, job_id: str) -> None:
        with self._cond:
            self._running.pop(job_id, None)
            self._cond.notify_all()


class _Run:
    """One running job: its worker process and the thread that follows it."""

    def __init__(self, manager: JobManager, job: Job):
        self.manager = manager
        self.job = job
        self.dir = manager.job_dir(job.id)
        self.thread = threading.Thread(target=self._main, name=f"training-{job.id}", daemon=True)
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stop_reason: str | None = None  # set by cancel() or stop()
        self._stopped_state = "cancelled"

    def cancel(self) -> None:
        self._signal("cancelled by the user", "cancelled")

    def stop(self, reason: str) -> None:
        self._signal(reason, "failed")

    def _signal(self, reason: str, state: str) -> None:
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason, self._stopped_state = reason, state
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the worker stops at the end of its step
            timer = threading.Timer(self.manager.config.cancel_grace_s, _kill_if_alive, (proc,))
            timer.daemon = True
            timer.start()

    def _main(self) -> None:
        store, job = self.manager.store, self.job
        try:
            outcome = self._work()
        except Exception as e:  # a bug here must not leave the job running forever
            log.exception("training job %s: runner failed", job.id)
            outcome = ("failed", {"error": f"the job runner failed: {type(e).__name__}: {e}"})
        state, fields = outcome
        if state == "succeeded":
            store.add_event(job.id, "evaluation", {"evaluation": fields["evaluation"]})
        self.manager._finish(job.id, state, **fields)
        shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(self.dir / "adapter", ignore_errors=True)
        log.info("training job %s %s%s", job.id, state, f": {fields['error']}" if fields.get("error") else "")
        self.manager._run_finished(job.id)

    def _work(self) -> tuple[str, dict]:
        cfg, job = self.manager.config, self.job
        (self.dir / "worker.json").write_text(json.dumps({
            "spec": job.spec.to_json(), "base_model": str(cfg.base_model), "device": cfg.device,
            "compute_dtype": cfg.compute_dtype, "nice": cfg.worker_nice,
        }))
        read_fd, write_fd = os.pipe()
        with open(self.dir / "worker.log", "ab") as log_file:
            with self._lock:
                if self._stop_reason is not None:
                    os.close(read_fd)
                    os.close(write_fd)
                    return self._stopped_state, {"error": self._stop_reason}
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "adapterd.training.worker", str(self.dir), "--events-fd", str(write_fd)],
                    pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C at the server's terminal is not the worker's
                )
            os.close(write_fd)
            final: dict | None = None
            with os.fdopen(read_fd, encoding="utf-8", errors="replace") as events:
                for line in events:
                    event = _parse(line)
                    if event is not None and self._on_event(event):
                        final = event
            returncode = self.proc.wait()
        if self._stop_reason is not None:
            return self._stopped_state, {"error": self._stop_reason}
        if final is not None and final["type"] == "error":
            return "failed", {"error": final.get("message", "the worker failed")}
        if final is None or final["type"] != "done" or returncode != 0:
            return "failed", {"error": self._death_reason(returncode)}
        self.manager.store.add_event(job.id, "message", {"message": "publishing the adapter to the registry"})
        metrics = {**flat_metrics(final["evaluation"]), **_numbers(final["training"], "training.")}
        try:
            ref = self.manager.publish(job.tenant, job.name, Path(final["adapter_dir"]), job_id=job.id,
                                       description=job.spec.description, metrics=metrics)
        except Exception as e:
            return "failed", {"error": f"the registry refused the trained adapter: {e}"}
        return "succeeded", {"adapter": ref, "training": final["training"], "evaluation": final["evaluation"]}

    def _on_event(self, event: dict) -> bool:
        """Store one worker event; True for the final ones (done, error, cancelled)."""
        store, job_id = self.manager.store, self.job.id
        kind, at = event.pop("type"), event.pop("time", None)
        if kind in ("done", "error", "cancelled"):
            event["type"] = kind
            return True
        if kind == "status":
            store.add_event(job_id, "message", {"message": event.get("message", "")}, at=at)
        elif kind in ("started", "step", "eval"):
            store.add_event(job_id, kind, event, at=at)
            progress = {"total_steps": event["total_steps"]} if "total_steps" in event else {}
            if kind == "step":
                progress.update(step=event["step"], loss=event["loss"])
                if self.manager.metrics is not None:
                    self.manager.metrics.training_progress(job_id, event["step"], event["loss"])
            if progress:
                store.update(job_id, **progress)
        return False

    def _death_reason(self, returncode: int) -> str:
        if returncode < 0:
            name = signal.Signals(-returncode).name
            cause = " (out of memory?)" if returncode == -signal.SIGKILL else ""
            reason = f"the training worker was killed by {name}{cause}"
        else:
            reason = f"the training worker exited with status {returncode} without finishing"
        tail = _tail(self.dir / "worker.log")
        return f"{reason}; its last output: {tail}" if tail else reason


def _parse(line: str) -> dict | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


def _numbers(d: dict, prefix: str) -> dict[str, float]:
    return {prefix + k: float(v) for k, v in d.items() if isinstance(v, int | float)}


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_CHARS))
            return " ".join(f.read().decode("utf-8", "replace").split()[-60:])
    except OSError:
        return ""


def _kill_if_alive(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()


