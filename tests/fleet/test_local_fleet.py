"""deploy/local/fleet.py for real on loopback: three `adapterd serve` replicas on the demo
model, one S3 registry (moto), nginx balancing on the adapterd-adapter header, and the
health sidecar. What a user of the fleet relies on:

- a push through the balancer is served by every replica within the registry refresh interval;
- each adapter's requests land on one replica, and the adapters spread over the replicas;
- training goes to the training replica, and what it publishes every replica serves;
- kill -9 of a replica under 200 concurrent calls: every call ends with a status, the
  calls it had not started succeed elsewhere, nothing is lost, the registry stays whole,
  and the replica rejoins once restarted;
- SIGTERM: the replica drains (NOT_SERVING, the balancer stops sending it work) and its
  streams finish; nothing fails.

Skipped where nginx is not installed (.ci/run installs it, as Debian's package).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import grpc
import pytest
from adapterctl.adapters import AdaptersClient
from adapterctl.client import Client
from adapterctl.train import TrainingClient
from adapterd_api.v1 import inference_pb2 as pb
from adapterd_api.v1 import training_pb2 as tpb

from tests.fleet.harness import FLEET, REPO, TRAINING_REPLICA, Fleet, wait_for, write_lora

pytestmark = pytest.mark.slow

ADAPTERS = [f"fa{i}" for i in range(12)]
REFRESH_S = 1.0
MAX_BATCH = 16
SERVE_FLAGS = ["--max-batch-size", str(MAX_BATCH), "--max-queue", "512", "--max-input-tokens", "64",
               "--max-total-tokens", "512", "--gpu-slots", "4", "--max-rank", "16", "--cpu-adapters", "16"]


def _nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if _nginx() is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
    from adapterd.engine.demo import demo_model_dir

    base = demo_model_dir()
    run = tmp_path_factory.mktemp("fleet")
    f = Fleet(run)
    start = subprocess.Popen(
        [sys.executable, str(FLEET), "start", "--run-dir", str(run), "--port", "0", "--base-model", str(base),
         "--registry-refresh", str(REFRESH_S), "--torch-threads", "1", "--grace-period", "30",
         "--start-timeout", "150", "--", *SERVE_FLAGS],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # While the replicas load: one PEFT adapter for the demo model, pushed under every name.
        adapter = write_lora(base, run / "adapter", rank=4, seed=7)
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out
        with f.client() as c:
            pusher = AdaptersClient(c)
            for name in ADAPTERS:
                pusher.push(adapter, name)
        f.adapter_dir = adapter
        yield f
    finally:
        if start.poll() is None:
            start.kill()
        if (run / "fleet.json").exists():
            f.cli("stop", timeout=120)


def _victim(f: Fleet, placement: dict) -> tuple[str, list[str]]:
    """The replica (not the training one) that serves the most adapters, and those adapters."""
    owner = {a: next(iter(c)) for a, c in placement.items()}
    candidates = [n for n in f.replicas if n != TRAINING_REPLICA]
    victim = max(candidates, key=lambda n: sum(1 for o in owner.values() if o == n))
    mine = [a for a, o in owner.items() if o == victim]
    assert mine, f"no adapter hashes to {victim}: {owner}"
    return victim, mine


def test_a_push_through_the_balancer_is_served_by_every_replica_within_the_refresh(fleet):
    fleet.ensure_all_up()
    with fleet.client() as c:
        AdaptersClient(c).push(fleet.adapter_dir, "fresh")
    # Every replica resolves "fresh" now, so each caches its listing (version 1) ...
    for name in fleet.replicas:
        with fleet.client(name) as d:
            assert d.generate("hi", adapter="fresh", max_new_tokens=2).adapter == "fresh@1"
    with fleet.client() as c:
        assert AdaptersClient(c).push(fleet.adapter_dir, "fresh").version == 2
    pushed = time.monotonic()
    # ... and serves version 2 for plain "fresh" within the refresh interval.
    seen: dict[str, float] = {}
    for name in fleet.replicas:
        with fleet.client(name) as d:
            wait_for(lambda d=d: d.generate("hi", adapter="fresh", max_new_tokens=2).adapter == "fresh@2",
                     REFRESH_S + 5, f"{name} to serve fresh@2", every=0.05)
        seen[name] = time.monotonic() - pushed
    print(f"fresh@2 served by every replica after {max(seen.values()):.2f} s (refresh {REFRESH_S} s): {seen}")
    assert max(seen.values()) <= REFRESH_S + 1.0  # slack for a loaded 2-core machine
    # A version pinned by number is found at once, without waiting for the refresh.
    with fleet.client() as c:
        assert AdaptersClient(c).push(fleet.adapter_dir, "fresh").version == 3
    for name in fleet.replicas:
        with fleet.client(name) as d:
            assert d.generate("hi", adapter="fresh@3", max_new_tokens=2).adapter == "fresh@3"


def test_each_adapter_lands_on_one_replica_and_adapters_spread(fleet):
    fleet.ensure_all_up()
    placement = fleet.placement(ADAPTERS, per_adapter=4)
    spread = Counter(next(iter(c)) for c in placement.values())
    print(f"adapters per replica: {dict(spread)}")
    for adapter, counts in placement.items():
        assert len(counts) == 1, f"{adapter} was served by {dict(counts)}"
    assert len(spread) >= 2, f"every adapter hashed to one replica: {dict(spread)}"
    # The same again: the ring does not move while the replicas stay.
    assert fleet.placement(ADAPTERS, per_adapter=1) == {a: Counter({next(iter(c)): 1}) for a, c in placement.items()}


def test_training_goes_to_the_training_replica_and_every_replica_serves_its_adapter(fleet, tmp_path):
    fleet.ensure_all_up()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "Q: {q}\\nA: ", "completion": "{a}"}}\n' for q, a in [
        ("drop rows with NaN", "df.dropna()"), ("first 5 rows", "df.head()"),
        ("transpose m", "m.T"), ("sort by age", "df.sort_values('age')")]))
    with fleet.client() as c:
        training = TrainingClient(c)
        job = training.create(data, name="fleet-trained", epochs=1, batch_size=4, max_eval_examples=1,
                              eval_max_new_tokens=4)
        assert training.get(job.id).id == job.id  # through the balancer: the same replica again
        with fleet.client(TRAINING_REPLICA) as d:
            assert TrainingClient(d).get(job.id).id == job.id
        for name in fleet.replicas:
            if name != TRAINING_REPLICA:
                with fleet.client(name) as d, pytest.raises(grpc.RpcError) as e:
                    TrainingClient(d).get(job.id)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND

        # Follow it to its end through the balancer, as `adapterctl jobs watch` does (bounded).
        events = training.watch(job.id)
        timer = threading.Timer(120, events.cancel)
        timer.start()
        try:
            states = [ev.state for ev in events if ev.type == tpb.STATE]
        finally:
            timer.cancel()
        assert states and states[-1] == tpb.SUCCEEDED, f"job ended {states}: {training.get(job.id)}"
    for name in fleet.replicas:
        with fleet.client(name) as d:
            assert d.generate("Q: transpose m\nA: ", adapter="fleet-trained", max_new_tokens=4).adapter == "fleet-trained@1"


def _call(client: Client, i: int, adapter: str, stream: bool, tokens: int, started: Counter, lock) -> dict:
    """One call, and how it ended: its status, the tokens it got, how it finished."""
    got, last = 0, None
    try:
        if stream:
            for msg in client.generate_stream(f"call {i}", adapter=adapter, max_new_tokens=tokens):
                got += len(msg.token_ids)
                last = msg
                if got == len(msg.token_ids):
                    with lock:
                        started[adapter] += 1
        else:
            last = client.generate(f"call {i}", adapter=adapter, max_new_tokens=tokens)
            got = len(last.token_ids)
        return {"i": i, "adapter": adapter, "stream": stream, "code": "OK", "tokens": got,
                "completion_tokens": last.completion_tokens, "finish": last.finish_reason}
    except grpc.RpcError as e:
        return {"i": i, "adapter": adapter, "stream": stream, "code": e.code().name, "tokens": got,
                "details": e.details()}


def _listing(fleet: Fleet, name: str) -> set[tuple[str, int]]:
    with fleet.client(name) as d:
        return {(a.name, a.version) for a in AdaptersClient(d).list(all_versions=True)}


def test_kill_9_under_200_concurrent_calls(fleet):
    fleet.ensure_all_up()
    victim, mine = _victim(fleet, fleet.placement(ADAPTERS, per_adapter=1))
    tokens = 16
    started: Counter = Counter()
    lock = threading.Lock()
    calls = [(i, ADAPTERS[i % len(ADAPTERS)] if i % 4 else "", i % 2 == 1) for i in range(200)]
    pushes: list = []
    with fleet.client(timeout=60) as client, ThreadPoolExecutor(210) as pool:
        futures = [pool.submit(_call, client, i, a, s, tokens, started, lock) for i, a, s in calls]
        # Pushes of new versions during the kill: a replica dying mid-push must leave no half version.
        # Four, the most one tenant may have in progress at once (--max-uploads-per-tenant): a fifth
        # would be refused RESOURCE_EXHAUSTED whenever all of them were still uploading together.
        pushes = [pool.submit(_push, fleet, f"reg{k}") for k in range(4)]
        wait_for(lambda: sum(started[a] for a in mine) >= 2, 60, f"streams running on {victim}", every=0.01)
        fleet.signal(victim, signal.SIGKILL)
        killed, killed_wall = time.monotonic(), time.time()
        done, pending = wait(futures + pushes, timeout=90)
        assert not pending, f"{len(pending)} calls never ended"
    results = [f.result() for f in futures]
    codes = Counter(r["code"] for r in results)
    failed = [r for r in results if r["code"] != "OK"]
    print(f"kill -9 {victim} ({len(mine)} adapters) under 200 calls: {dict(codes)} within "
          f"{time.monotonic() - killed:.1f} s of the kill; failed: "
          f"{[(r['stream'], r['tokens'], r['code']) for r in failed]}")

    assert len(results) == 200
    for r in results:
        if r["code"] == "OK":  # nothing silently cut short
            assert r["finish"] != pb.FINISH_REASON_UNSPECIFIED and r["completion_tokens"] == r["tokens"], r
        else:  # only a stream the victim had already sent tokens of may fail (it is never replayed)
            assert r["stream"] and r["tokens"] > 0 and r["adapter"] in (*mine, ""), r
    assert len(failed) <= MAX_BATCH  # at most the rows the victim was decoding

    victim_addr = fleet.replicas[victim]["addr"]
    wait_for(lambda: victim_addr in fleet.down(), 10, f"the sidecar to mark {victim} down")
    restarted = fleet.restart(victim, wait=False)  # it loads while the registry is checked
    # Calls the victim had taken (queued, or running without a token sent) that nginx
    # answered UNAVAILABLE when it died: the client retried each of them elsewhere.
    taken = [ln for ln in fleet.access_log() if ln.start <= killed_wall and ln.served_by == victim_addr
             and ln.grpc == "14"]
    assert taken, "the kill found no call waiting on the victim: the test did not test retries"

    # The registry: every replica left lists the same versions, and each one is whole.
    pushed = [p.result() for p in pushes]
    alive = [n for n in fleet.replicas if n != victim]
    listings = [_listing(fleet, n) for n in alive]
    assert all(x == listings[0] for x in listings), listings
    assert {v for v in pushed if v is not None} <= listings[0]
    for name, version in sorted(v for v in listings[0] if v[0].startswith("reg")):
        for n in alive:
            with fleet.client(n) as d:
                assert d.generate("x", adapter=f"{name}@{version}", max_new_tokens=1).adapter == f"{name}@{version}"

    # Restarted, it rejoins: the balancer routes its adapters to it again.
    fleet.wait_rejoined(victim, adapter=mine[0])
    rejoin_s = time.monotonic() - restarted
    assert _listing(fleet, victim) == listings[0]
    again = fleet.placement(mine, per_adapter=2)
    print(f"kill -9: {len(taken)} calls the victim had taken were retried elsewhere; restarted, it was "
          f"routed to again after {rejoin_s:.1f} s; pushes during the kill: {pushed}")
    assert all(set(c) == {victim} for c in again.values()), again


def _push(fleet: Fleet, name: str):
    with fleet.client(timeout=60) as c:
        try:
            v = AdaptersClient(c).push(fleet.adapter_dir, name)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            return None
    return (v.name, v.version)


def test_sigterm_drains_the_replica_and_nothing_fails(fleet):
    fleet.ensure_all_up()
    victim, mine = _victim(fleet, fleet.placement(ADAPTERS, per_adapter=1))
    victim_addr = fleet.replicas[victim]["addr"]
    others = [a for a in ADAPTERS if a not in mine]
    statuses: list[tuple[float, str]] = []

    def watch_health():
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(victim_addr) as ch:
            try:
                for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                    statuses.append((time.time(), health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)))
                    if statuses[-1][1] == "NOT_SERVING":
                        return  # ending the call lets the drain finish
            except grpc.RpcError:
                pass

    started: Counter = Counter()
    lock = threading.Lock()
    down_at = None
    with fleet.client(timeout=60) as client, ThreadPoolExecutor(96) as pool:
        watcher = pool.submit(watch_health)
        wait_for(lambda: statuses and statuses[-1][1] == "SERVING", 10, "the health watch")
        streams = [pool.submit(_call, client, i, mine[i % len(mine)], True, 400, started, lock) for i in range(6)]
        wait_for(lambda: sum(started.values()) == 6, 60, f"6 streams running on {victim}", every=0.01)
        fleet.signal(victim, signal.SIGTERM)
        termed = time.time()
        # New work while it drains: its adapters, the others and the base model, for ~4 s.
        wave = []
        for k in range(16):
            wave += [pool.submit(_call, client, 1000 + 4 * k + j, a, False, 4, Counter(), lock)
                     for j, a in enumerate((mine[k % len(mine)], others[k % len(others)], mine[0], ""))]
            if down_at is None and victim_addr in fleet.down():
                down_at = time.time()
            time.sleep(0.25)
        down_at = down_at or wait_for(lambda: victim_addr in fleet.down() and time.time(), 10, f"{victim} marked down")
        done, pending = wait([*streams, *wave, watcher], timeout=90)
        assert not pending
    stream_results = [s.result() for s in streams]
    wave_results = [w.result() for w in wave]
    not_serving = next((t for t, s in statuses if s == "NOT_SERVING"), None)
    log = [ln for ln in fleet.access_log() if ln.start > termed and ln.uri.endswith("/Generate")]
    on_victim = [ln for ln in log if ln.served_by == victim_addr and ln.grpc == "0"]
    refused = [ln for ln in log if victim_addr in ln.upstreams and not (ln.served_by == victim_addr and ln.grpc == "0")]
    # Give nginx's reload a moment to take effect before counting calls the victim still took.
    served_late = [ln for ln in on_victim if ln.start > down_at + 0.5]
    print(f"SIGTERM {victim}: NOT_SERVING after {not_serving - termed:.2f} s, marked down after "
          f"{down_at - termed:.2f} s; streams {[(r['code'], r['tokens']) for r in stream_results]}, "
          f"new calls {dict(Counter(r['code'] for r in wave_results))}: {len(on_victim)} served by {victim} "
          f"while balancers noticed, {len(refused)} refused by it (and retried)")

    assert not_serving is not None, statuses
    for r in stream_results:  # every stream ran to its end
        assert r["code"] == "OK" and r["finish"] != pb.FINISH_REASON_UNSPECIFIED, r
        assert r["tokens"] == r["completion_tokens"], r
    assert all(r["code"] == "OK" for r in wave_results), [r for r in wave_results if r["code"] != "OK"]
    assert not served_late, served_late[:3]  # the balancer sent it no new work
    wait_for(lambda: not fleet.alive(victim), 40, f"{victim} to exit after draining")
    assert "stopped" in Path(fleet.replicas[victim]["log"]).read_text().splitlines()[-1]
