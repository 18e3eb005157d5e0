"""The job store and runner with real worker processes on the tiny Llama: persistence across
a restart, cancellation within a step (running and queued), tenancy, nothing queued when
the data is bad."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from adapterd.config import TrainingConfig
from adapterd.errors import InvalidArgument, NotFound
from adapterd.training.jobs import JobManager
from adapterd.training.spec import TrainingSpec

PAIRS = [(f"Q: what is {i} plus {i}?\nA: ", str(i + i)) for i in range(6)]


def dataset(pairs=PAIRS) -> bytes:
    return "\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in pairs).encode()


class Published:
    """A stand-in for the registry: records what it is given while the files exist."""

    def __init__(self):
        self.calls = []

    def __call__(self, tenant, name, adapter_dir: Path, *, job_id, description, metrics):
        files = sorted(p.name for p in adapter_dir.iterdir())
        self.calls.append(dict(tenant=tenant, name=name, files=files, job_id=job_id, metrics=metrics))
        return f"{name}@{len(self.calls)}"


@pytest.fixture
def make_manager(model_factory, tmp_path):
    managers = []

    def make(*, start: bool = True, publish=None, **kw) -> JobManager:
        config = TrainingConfig(jobs_dir=tmp_path / "training", worker_nice=0, cancel_grace_s=20)
        from adapterd.engine.demo import build_tokenizer

        m = JobManager(config, base_model=model_factory("llama"), device="cpu", publish=publish or Published(),
                       tokenizer=build_tokenizer(), **kw)
        managers.append(m)
        return m.start() if start else m

    yield make
    for m in managers:
        if not m._closing and m._scheduler is not None:
            m.close()


def events_until(manager, tenant, job_id, stop=lambda e: False, timeout=120.0):
    """Follow the job's events (replayed, then live) until `stop(event)` or the job ends."""

    async def collect():
        seen = []
        async for event in manager.follow(tenant, job_id):
            seen.append(event)
            if stop(event):
                break
        return seen

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def states(events):
    return [e.data["state"] for e in events if e.type == "state"]


def test_restart_fails_the_running_job_and_runs_the_queued_one(make_manager):
    published = Published()
    before = make_manager(start=False, publish=published)
    queued = before.create("default", TrainingSpec(name="adds", epochs=2, learning_rate=1e-3, batch_size=2,
                                                   max_eval_examples=8, eval_max_new_tokens=16), dataset())
    cut_off = before.create("default", TrainingSpec(name="other"), dataset())
    before.store.update(cut_off.id, state="running")  # as if the server died mid-run
    before.store.close()

    after = make_manager(publish=published)  # the same directory: a restarted server
    failed = after.get("default", cut_off.id)
    assert failed.state == "failed" and "server stopped while this job was running" in failed.error
    events = events_until(after, "default", queued.id)
    assert states(events) == ["validating", "queued", "running", "succeeded"]  # replayed from the start
    job = after.get("default", queued.id)
    assert job.state == "succeeded" and job.adapter == "adds@1"
    (call,) = published.calls
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(call["files"])
    assert call["job_id"] == queued.id and "validation.adapter.rougeL.f1" in call["metrics"]
    steps = [e.data for e in events if e.type == "step"]
    assert len(steps) == job.total_steps == 2 * 3  # 5 training examples (1 held out), batch 2, 2 epochs
    assert job.evaluation["validation"]["examples"] == 1


def test_cancel_stops_a_running_job_within_a_step_and_a_queued_one_at_once(make_manager):
    m = make_manager()
    long = TrainingSpec(name="long", epochs=1000, batch_size=1)
    running = m.create("default", long, dataset())
    waiting = m.create("default", long, dataset())  # --max-concurrent-jobs 1: it queues

    before = events_until(m, "default", running.id, stop=lambda e: e.type == "step")
    assert m.get("default", waiting.id).state == "queued"
    assert m.cancel("default", waiting.id).state == "cancelled"

    # Hold the worker where it is, as the pacer does, so the steps it reported have all reached
    # the store when the cancel is sent (a fast machine runs several tiny steps in the time an
    # event takes to arrive); the cancel's SIGCONT lets it go on, to the end of its step.
    os.killpg(m.running_pid(running.id), signal.SIGSTOP)
    time.sleep(1.0)
    last_step = max(e.data["step"] for e in m.store.events(running.id) if e.type == "step")
    assert m.cancel("default", running.id).state == "running"  # it stops at the end of its step
    events = events_until(m, "default", running.id)
    assert states(events)[-1] == "cancelled" and len(before) < len(events)
    final_step = max(e.data["step"] for e in events if e.type == "step")
    assert final_step <= last_step + 2, "more than one step ran after the cancel"
    job = m.get("default", running.id)
    assert job.error == "cancelled by the user" and not job.adapter
    assert states(events_until(m, "default", waiting.id)) == ["validating", "queued", "cancelled"]


def test_jobs_belong_to_their_tenant(make_manager):
    m = make_manager(start=False)
    mine = m.create("acme", TrainingSpec(name="a"), dataset())
    m.create("globex", TrainingSpec(name="b"), dataset())
    assert [j.id for j in m.list("acme")[0]] == [mine.id]
    for call in (m.get, m.cancel):
        with pytest.raises(NotFound):
            call("globex", mine.id)
    with pytest.raises(NotFound):
        events_until(m, "globex", mine.id)
    assert m.get("acme", mine.id).state == "queued"


def test_bad_data_queues_nothing_and_leaves_nothing(make_manager, tmp_path):
    m = make_manager(start=False)
    with pytest.raises(InvalidArgument, match="training file line 7"):
        m.create("default", TrainingSpec(name="x"), dataset() + b"\n{not json")
    with pytest.raises(InvalidArgument, match="validation file line 1"):
        m.create("default", TrainingSpec(name="x"), dataset(), validation=b'{"question": 1}')
    with pytest.raises(InvalidArgument, match="--max-rank 8"):
        JobManager(m.config, base_model=m.base_model, max_rank=8, publish=Published(),
                   tokenizer=m.tokenizer).create("default", TrainingSpec(name="x", rank=16), dataset())
    m.set_module_names(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"])
    with pytest.raises(InvalidArgument, match="no linear module named qkv"):
        m.create("default", TrainingSpec(name="x", target_modules=("q_proj", "qkv")), dataset())
    assert m.list("default") == ([], "")
    assert sorted(p.name for p in (tmp_path / "training").iterdir()) == ["jobs.sqlite3", "jobs.sqlite3-shm",
                                                                       "jobs.sqlite3-wal"]


def test_list_pages_newest_first(make_manager):
    m = make_manager(start=False)
    ids = [m.create("default", TrainingSpec(name=f"n{i}"), dataset()).id for i in range(5)]
    page, token = m.list("default", page_size=2)
    assert [j.id for j in page] == ids[::-1][:2] and token
    rest, end = m.list("default", page_size=10, page_token=token)
    assert [j.id for j in rest] == ids[::-1][2:] and end == ""
    assert m.list("default", states=["running"]) == ([], "")
