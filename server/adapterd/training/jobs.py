"""Training jobs: create, read, cancel and follow them; the queue that starts them.

    create()  -> validating -> queued -> running -> succeeded | failed | cancelled

`create` checks the whole dataset before anything is queued (data.py) and writes the
checked, tokenized examples into the job's directory. A scheduler thread starts queued
jobs, oldest first, at most --max-concurrent-jobs at once, each as a WorkerRun (runner.py)
in a worker process of its own; the store (store.py) keeps the jobs and their events.

Jobs and events survive a restart: a job found running at start-up was cut off with the
server and is failed with that reason; queued jobs run again. Every job belongs to a
tenant, and another tenant's job is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from adapterd_rules import quote

from adapterd.config import Quantization, TrainingConfig
from adapterd.errors import InvalidArgument, NotFound
from adapterd.training import data, general
from adapterd.training.pacing import Pacer
from adapterd.training.runner import WorkerRun
from adapterd.training.spec import ALL_LINEAR, TrainingSpec
from adapterd.training.store import ACTIVE, STATES, TERMINAL, Event, Job, JobStore

MAX_PAGE_SIZE = 100  # ListJobs
DEFAULT_PAGE_SIZE = 20
MAX_SEQ = 2**63 - 1  # events' seq is an SQLite INTEGER (signed 64-bit)

# publish(tenant, name, adapter_dir, job_id=, description=, metrics=) -> "name@N"
Publish = Callable[..., str]


class JobManager:
    """The jobs of every tenant: create, read, cancel, follow; and the queue."""

    def __init__(self, config: TrainingConfig, *, base_model: Path, publish: Publish, device: str = "auto",
                 compute_dtype: str = "auto", quantization: Quantization = "nf4", max_rank: int | None = None,
                 max_virtual_tokens: int | None = None, tokenizer=None, module_names: Iterable[str] = (), metrics=None):
        """`base_model`: the served base model's directory (each worker loads its own copy,
        on `device` in `compute_dtype`, stored as `quantization`: as the server serves it);
        `max_rank`: the server's --max-rank (a larger adapter could not be served), and
        `max_virtual_tokens` its --max-virtual-tokens;
        `tokenizer`: the base model's, to check example lengths (default: loaded from
        base_model at start); `module_names`: the base model's linear
        modules, to check --target-modules before a job is queued (or later,
        set_module_names); `metrics`: an adapterd.metrics.Metrics for jobs by state and the
        running jobs' loss."""
        self.config = config
        self.base_model = Path(base_model)
        self.device = device
        self.compute_dtype = compute_dtype
        self.quantization = quantization
        self.max_rank = max_rank
        self.max_virtual_tokens = max_virtual_tokens
        self._pacer: Pacer | None = None
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.publish = publish
        self.set_module_names(module_names)
        config.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(config.jobs_dir / "jobs.sqlite3")
        self._cond = threading.Condition()
        self._running: dict[str, WorkerRun] = {}
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

            self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
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
        if self._pacer is not None:
            self._pacer.close()  # every worker continued, so it can stop
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

    def pace(self, busy: Callable[[], bool]) -> None:
        """Pause the workers while `busy()` (the server has requests), per --training-share
        (pacing.py)."""
        if self._pacer is not None:
            self._pacer.close()
        self._pacer = Pacer(busy, self._pausable_pids, share=self.config.share).start()

    def _pausable_pids(self) -> list[int]:
        with self._cond:
            runs = list(self._running.values())
        return [r.proc.pid for r in runs if r.proc is not None and r.proc.poll() is None and not r.stopping]

    def kill_workers(self) -> None:
        """SIGKILL every running worker (and what it started) at once, waiting for nothing:
        for a forced exit (a second SIGTERM), so that no worker outlives the server."""
        with self._cond:
            runs = list(self._running.values())
        for run in runs:
            run.kill()

    # ---- the API --------------------------------------------------------------------------

    def create(self, tenant: str, spec: TrainingSpec, training: bytes, validation: bytes | None = None,
               retention: bytes | None = None) -> Job:
        """Check the data (InvalidArgument naming the file and line) and queue the job. On
        any error nothing is queued and no job is left behind."""
        self._check_spec(spec)
        job = Job(id=f"ftjob-{secrets.token_hex(12)}", tenant=tenant, state="validating", spec=spec,
                  created_at=time.time())
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

    def running_pid(self, job_id: str) -> int | None:
        """The process id of the job's worker while it runs."""
        with self._cond:
            run = self._running.get(job_id)
        proc = run.proc if run is not None else None
        return proc.pid if proc is not None else None

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
        return self.config.jobs_dir / job_id

    def active_jobs(self, tenant: str) -> int:
        """The tenant's jobs not yet finished: what its max_training_jobs limit counts."""
        counts = self.store.count_by_state(tenant)
        return sum(counts.get(s, 0) for s in ACTIVE)

    # ---- checks before queueing -----------------------------------------------------------

    def _check_spec(self, spec: TrainingSpec) -> None:
        if self.max_rank is not None and spec.rank > self.max_rank:
            raise InvalidArgument(
                f"--rank {spec.rank} is above this server's --max-rank {self.max_rank}: "
                "the adapter could not be served"
            )
        if (spec.method.endswith("tuning") and self.max_virtual_tokens is not None
                and spec.virtual_tokens > self.max_virtual_tokens):
            raise InvalidArgument(
                f"--virtual-tokens {spec.virtual_tokens} is above this server's --max-virtual-tokens "
                f"{self.max_virtual_tokens}: the adapter could not be served"
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
        if spec.shrink_to_gain and not val:
            raise InvalidArgument("--shrink-to-gain chooses the adapter's strength on the validation split, and "
                                  "there is none: send --validation FILE or keep --val-split above 0")
        retain = parse(retention, "retention file") if retention is not None else []
        job_dir.mkdir(parents=True)
        for name, examples in (("train", train), ("validation", val), ("retention", retain)):
            data.write_examples(job_dir / f"{name}.jsonl", examples)
        # Without a retention file the worker scores the built-in general set.
        n_retention = len(retain) or min(len(general.RETENTION), spec.max_eval_examples)
        return {"train_examples": len(train), "validation_examples": len(val), "retention_examples": n_retention}

    # ---- state ----------------------------------------------------------------------------

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
        return self._transition(job_id, state, from_states=ACTIVE, **fields)

    # ---- the queue ------------------------------------------------------------------------

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
                run = self._run(self.store.get(job.id))
                self._running[job.id] = run
            run.start()

    def _run(self, job: Job) -> WorkerRun:
        def progress(fields: dict) -> None:
            self.store.update(job.id, **fields)
            if self.metrics is not None and "step" in fields:
                self.metrics.training_progress(job.id, fields["step"], fields["loss"])

        def publish(adapter_dir: Path, metrics: dict) -> str:
            return self.publish(job.tenant, job.name, adapter_dir, job_id=job.id, description=job.spec.description,
                                metrics=metrics)

        def finished(state: str, fields: dict) -> None:
            self._finish(job.id, state, **fields)
            with self._cond:
                self._running.pop(job.id, None)
                self._cond.notify_all()

        settings = {"spec": job.spec.to_json(), "base_model": str(self.base_model), "device": self.device,
                    "compute_dtype": self.compute_dtype, "quantization": self.quantization,
                    "nice": self.config.worker_nice,
                    "threads": self.config.worker_threads}
        return WorkerRun(
            job, self.job_dir(job.id), settings, cancel_grace_s=self.config.cancel_grace_s,
            record=lambda type_, data, at: self.store.add_event(job.id, type_, data, at=at),
            progress=progress, publish=publish, finished=finished,
        )
