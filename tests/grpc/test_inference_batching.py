"""Mixed-adapter batches through the whole server: one load for many first requests, and a
request's greedy output the same alone, among 31 others, and through slot evictions."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest
from adapterd.engine.limits import GenerateArgs

from tests.grpc.conftest import ADAPTERS
from tests.grpc_harness import TEST_SCHEDULER, request

PROMPTS = ["The quick brown fox", "Hello", "In a hole in the ground", "0123", "Once upon a time there was"]


def _mixed_requests(n: int, adapters: list[str]):
    """n requests cycling over adapters and prompts of different lengths."""
    cycle = zip(itertools.cycle(adapters), itertools.cycle(PROMPTS), strict=False)
    return [request(p, adapter=a, max_new_tokens=12 + i % 5) for i, (a, p) in zip(range(n), cycle, strict=False)]


def _alone(server, reqs) -> list[str]:
    return [server.inference.Generate(r).text for r in reqs]


def _together(server, reqs) -> list[str]:
    futures = [server.inference.Generate.future(r) for r in reqs]
    return [f.result(timeout=120).text for f in futures]


def test_adapters_really_differ(serve):
    server = serve()
    outs = {a: server.inference.Generate(request("The quick brown fox", adapter=a)).text for a in ["", *ADAPTERS]}
    assert len(set(outs.values())) == len(outs), outs


def test_fifty_concurrent_first_requests_cause_one_load(serve):
    server = serve()
    futures = [server.inference.Generate.future(request("Hello there", adapter="a3")) for _ in range(50)]
    outs = [f.result(timeout=20) for f in futures]
    assert server.engine.stats()["loads"] == 1
    assert len({(o.text, tuple(o.token_ids)) for o in outs}) == 1
    assert {o.adapter for o in outs} == {"a3@1"}
    assert outs[0].text == server.inference.Generate(request("Hello there", adapter="a3")).text


@pytest.mark.slow
def test_greedy_output_alone_equals_among_31_others(serve):
    server = serve()
    reqs = _mixed_requests(32, ["", *ADAPTERS])
    alone = _alone(server, reqs)
    assert _together(server, reqs) == alone
    assert server.engine.stats()["running"] == 0


@pytest.mark.slow
def test_greedy_output_survives_slot_evictions(serve):
    reference = serve()
    reqs = _mixed_requests(32, ADAPTERS)
    alone = _alone(reference, reqs)
    reference.stop()
    server = serve(gpu_slots=2)
    assert _together(server, reqs) == alone
    stats = server.engine.stats()
    assert stats["device_evictions"] >= len(ADAPTERS) - 2, stats
    assert stats["loads"] == len(ADAPTERS), stats  # the CPU tier keeps them: evicted slots reload from it
    assert stats["running"] == 0 and stats["queued"] == 0



@pytest.mark.parametrize("full", ["slots", "rows"])
def test_waiting_request_starts_when_the_last_running_rows_end(serve, full):
    """Regression (a hang): a request waits because every slot is pinned ("slots": 2 slots,
    a third adapter) or every row is taken ("rows": max batch 2, a third base-model call).
    The rows holding them all finish in the same step, so nothing is left running and no
    call arrives to wake the engine; it must still admit the waiting one, not sleep."""
    if full == "slots":
        server = serve(gpu_slots=2)
        adapters = ("a0", "a1", "a2")
        for a in adapters:  # a0 ends up in the CPU tier only, a1 and a2 in the two slots
            server.inference.Generate(request("warm up", adapter=a, max_new_tokens=2))
    else:
        server = serve(scheduler=dataclasses.replace(TEST_SCHEDULER, max_batch_size=2))
        adapters = ("", "", "")
    engine = server.engine

    async def burst():
        # One inbox batch (the handlers' lock held across the submits): a1 and a2 (resident;
        # or the first two base-model calls) start together, the first waits; the two running
        # ones finish in the same step (same prompt, same length, no EOS).
        with engine._cv:
            gens = [
                engine.submit(tenant="default", adapter=a, prompt="Hello there",
                              args=GenerateArgs(max_new_tokens=8, ignore_eos=True))
                for a in adapters
            ]
        out = []
        for g in gens:
            out.append([ev async for ev in g][-1].completion_tokens)
        return out

    done = asyncio.run_coroutine_threadsafe(burst(), server.loop)
    try:
        assert done.result(timeout=15) == [8, 8, 8]
    finally:
        done.cancel()
    stats = engine.stats()
    assert stats["running"] == 0 and stats["queued"] == 0, stats
