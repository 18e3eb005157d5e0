"""The paged KV cache through the whole server: prefix reuse that never crosses an adapter
or a version, a deleted version's blocks freed, and no block leaked after a thousand
requests of mixed lengths with cancels and deadlines."""

from __future__ import annotations

import random
import resource
import threading

import grpc
import pytest
from adapterd.config import CacheConfig, SchedulerConfig
from adapterd.registry.store import Registry, RegistryResolver, open_storage

from tests.grpc.conftest import MAX_RANK
from tests.grpc_harness import RunningServer, request

# The tiny test models attend over 512 positions.
LONG = SchedulerConfig(max_batch_size=16, max_queue=512, max_input_tokens=500, max_total_tokens=512)


def _prefix(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(n))


@pytest.fixture
def versioned(parts_for, registry_root, tmp_path):
    """A server over a registry holding x@1 and x@2 (different weights) and y@1."""
    parts = parts_for(8)
    registry = Registry(open_storage(tmp_path / "store"), spec=parts.spec, max_rank=MAX_RANK)
    registry.push("default", "x", registry_root / "a0")
    registry.push("default", "x", registry_root / "a1")
    registry.push("default", "y", registry_root / "a2")
    server = RunningServer.start(parts, RegistryResolver(registry), scheduler=LONG,
                                 cache=CacheConfig(gpu_slots=8, max_rank=MAX_RANK), registry=registry)
    yield server
    server.stop()


def _hits(server) -> int:
    return server.engine.kv_stats()["hits"]


def test_prefix_reuse_stays_within_its_adapter_and_version(versioned):
    server = versioned
    prefix = _prefix(480, 1)
    refs = ["x@1", "x@2", "y", ""]
    first: dict[str, list[int]] = {}
    for ref in refs:  # cold: each prefills the whole prefix, none hits another's blocks
        before = _hits(server)
        first[ref] = list(server.inference.Generate(request(prefix + "?", ref, max_new_tokens=8)).token_ids)
        assert _hits(server) == before, f"{ref!r} hit a block it never prefilled"
    assert len({tuple(v) for v in first.values()}) == 4, "the adapters and versions must answer differently"
    for ref in refs * 2:  # alternating: each hits its own 30 blocks and answers as before
        before = _hits(server)
        got = list(server.inference.Generate(request(prefix + "?", ref, max_new_tokens=8)).token_ids)
        assert _hits(server) - before == 480 // 16
        assert got == first[ref], ref


def test_deleting_a_version_frees_its_cached_blocks(versioned):
    server = versioned
    prefix = _prefix(400, 2)
    server.inference.Generate(request(prefix, "x@2", max_new_tokens=2))
    server.inference.Generate(request(prefix, "x@1", max_new_tokens=2))
    cached = server.engine.kv_stats()["cached"]
    assert cached >= 2 * (400 // 16)
    from adapterd_api.v1 import adapters_pb2 as apb

    server.adapters.DeleteAdapter(apb.DeleteAdapterRequest(adapter="x@2"))
    server.inference.Generate(request("wake", "", max_new_tokens=1))  # a step boundary
    left = server.engine.kv_stats()["cached"]
    assert cached - left >= 400 // 16  # x@2's blocks are gone, x@1's stay
    before = _hits(server)
    server.inference.Generate(request(prefix, "x@1", max_new_tokens=2))
    assert _hits(server) - before == (400 - 1) // 16  # its last token is always computed


@pytest.mark.slow
def test_no_block_leaks_after_a_thousand_requests_with_cancels_and_deadlines(serve):
    server = serve(scheduler=SchedulerConfig(max_batch_size=16, max_queue=1024, max_input_tokens=200,
                                             max_total_tokens=256))
    adapters = ["", "a0", "a1", "a2", "a3"]
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def worker(seed: int) -> None:
        r = random.Random(seed)
        for i in range(125):
            prompt = _prefix(r.randint(1, 180), seed * 1000 + i % 7)  # some prompts repeat: prefix hits
            req = request(prompt, r.choice(adapters), max_new_tokens=r.randint(1, 40), ignore_eos=True)
            kind = r.random()
            try:
                if kind < 0.15:  # a client that goes away mid-stream
                    stream = server.inference.GenerateStream(req)
                    next(stream)
                    stream.cancel()
                    code = "CANCELLED"
                elif kind < 0.25:  # a deadline that cannot be met
                    server.inference.Generate(req, timeout=0.01 + r.random() * 0.05)
                    code = "OK"
                else:
                    server.inference.Generate(req, timeout=120)
                    code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                outcomes[code] = outcomes.get(code, 0) + 1

    rss = []
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert not any(t.is_alive() for t in threads)
    assert sum(outcomes.values()) == 1000
    assert set(outcomes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, outcomes
    assert outcomes.get("OK", 0) > 700
    server.inference.Generate(request("settle", max_new_tokens=1))
    kv = server.engine.kv_stats()
    assert kv["held"] == 0 and kv["tokens"] == 0, kv  # every block back: free, or cached for reuse
    assert kv["held"] + kv["cached"] + kv["free"] == kv["total"]
    assert kv["reserved"] == 0
    assert kv["hits"] > 0, "repeated prompts must have hit the prefix cache"
    assert rss[-1] - rss[0] < 200 * 1024, "memory kept growing (KiB)"
