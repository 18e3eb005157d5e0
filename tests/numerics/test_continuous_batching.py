"""Continuous batching: merging a request into a running batch, dropping rows, seeds."""

from __future__ import annotations

import pytest
import torch
from adapterd.engine.generate import Generator, Request
from adapterd.engine.lora import inject_lora
from adapterd.engine.model import load_base_model
from adapterd.engine.sampling import SamplingParams
from adapterd.registry.validate import read_adapter

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(model_factory, adapter_factory):
    base = model_factory("llama")
    model, tokenizer, spec = load_base_model(base, device=torch.device("cpu"))
    slots = inject_lora(model, num_slots=3, max_rank=16)
    slots.load(1, read_adapter(adapter_factory(base, "llama", seed=21), spec, 16))
    slots.load(2, read_adapter(adapter_factory(base, "llama", seed=22, rank=4), spec, 16))
    return model, tokenizer, slots


def _run(gen: Generator, schedule: dict[int, list[Request]], abort_at: dict[int, list[str]] | None = None):
    """Drive the generator: schedule[step] requests join before decode step `step`."""
    out: dict[str, list[int]] = {}
    step = 0
    while gen.num_running or any(s >= step for s in schedule):
        for ids in (abort_at or {}).get(step, []):
            gen.abort([ids])
        events = gen.add(schedule.get(step, []))
        events += gen.step()
        for e in events:
            out.setdefault(e.request_id, []).append(e.token_id)
        step += 1
    return out


def _alone(engine, req: Request) -> list[int]:
    return _run(Generator(*engine), {0: [req]})[req.id]


def test_request_merged_mid_generation_gives_its_tokens_alone(engine):
    late = Request("late", list(b"merge me in"), GREEDY, slot=2)
    want = _alone(engine, late)
    early = [
        Request("e0", list(b"a much longer prompt that runs first"), SamplingParams(max_new_tokens=20), 1),
        Request("e1", list(b"short"), SamplingParams(max_new_tokens=20), 0),
        Request("e2", list(b"second adapter row"), SamplingParams(max_new_tokens=20), 2),
    ]
    got = _run(Generator(*engine), {0: early, 5: [late]})
    assert got["late"] == want
    for r in early:  # the running rows are not disturbed by the merge either
        assert got[r.id] == _alone(engine, r)


def test_dropping_rows_leaves_the_others_unchanged(engine):
    reqs = [Request(f"r{i}", list(f"prompt number {i}".encode()), SamplingParams(max_new_tokens=15), i % 3)
            for i in range(5)]
    full = _run(Generator(*engine), {0: reqs})
    cut = _run(Generator(*engine), {0: reqs}, abort_at={4: ["r1", "r3"]})
    for rid in ("r0", "r2", "r4"):
        assert cut[rid] == full[rid]
    assert len(cut["r1"]) < len(full["r1"])


def test_seeded_sampling_is_independent_of_the_batch(engine):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    req = Request("s", list(b"sample me"), params, 1)
    want = _alone(engine, req)
    others = [Request(f"o{i}", list(b"noise %d" % i), SamplingParams(max_new_tokens=10, temperature=1.0, seed=i), i % 3)
              for i in range(4)]
    got = _run(Generator(*engine), {0: others[:2] + [req], 2: others[2:]})
    assert got["s"] == want
    other_seed = _alone(engine, Request("s2", list(b"sample me"), SamplingParams(
        max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=99), 1))
    assert other_seed != want, "a different seed should give a different sample"


def _events(engine, req: Request):
    gen = Generator(*engine)
    events = gen.add([req])
    while gen.num_running:
        events += gen.step()
    return events


def test_finish_reasons_stop_sequences_and_logprobs(engine):
    plain = _events(engine, Request("g", list(b"stop test"), SamplingParams(max_new_tokens=24), 1))
    assert plain[-1].finish_reason == "length" and len(plain) == 24
    released = "".join(e.text for e in plain)
    assert released, "the adapter should print something in 24 tokens"
    stop = released[len(released) // 2]
    events = _events(engine, Request("x", list(b"stop test"), SamplingParams(max_new_tokens=24, stop=(stop,), logprobs=True), 1))
    assert events[-1].finished and events[-1].finish_reason == "stop"
    streamed = "".join(e.text for e in events)
    assert streamed == released[: released.index(stop)], "text up to, not including, the stop sequence"
    assert all(e.logprob is not None and e.logprob <= 0 for e in events)


def test_eos_ends_a_row(engine):
    model, tokenizer, slots = engine
    first = _alone(engine, Request("f", list(b"eos"), SamplingParams(max_new_tokens=5), 0))
    gen = Generator(model, tokenizer, slots, eos_token_ids={first[2]})
    events = gen.add([Request("f", list(b"eos"), SamplingParams(max_new_tokens=5), 0)])
    while gen.num_running:
        events += gen.step()
    assert [e.token_id for e in events] == first[:3]
    assert events[-1].finish_reason == "eos"
    assert gen.num_running == 0 and gen.kv is None
    events = gen.add([Request("i", list(b"eos"), SamplingParams(max_new_tokens=5, ignore_eos=True), 0)])
    while gen.num_running:
        events += gen.step()
    assert [e.token_id for e in events] == first and events[-1].finish_reason == "length"


def test_repetition_penalty_changes_greedy_output(engine):
    plain = _alone(engine, Request("p", list(b"aaaa"), SamplingParams(max_new_tokens=12), 0))
    penal = _alone(engine, Request("p", list(b"aaaa"), SamplingParams(max_new_tokens=12, repetition_penalty=5.0), 0))
    assert len(set(plain)) < len(plain), "without the penalty greedy must repeat a token, or there is nothing to change"
    assert penal != plain
    assert len(set(penal)) > len(set(plain)), "the penalty must make the output repeat itself less"


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "segments"])
def test_row_layout_across_joins_and_finishes(engine, gathered):
    """Gathered: rows keep their places (a finished row's place goes to the last row, a join
    goes to the end), so the LoRA stacks change by a few rows. Segments: rows stay sorted by
    slot. Either way each request gets its tokens alone."""
    model, tokenizer, slots = engine
    reqs = {step: [Request(f"s{step}r{i}", list(f"row {i} joins at {step}".encode()),
                           SamplingParams(max_new_tokens=3 + (5 * i + step) % 9), (i + step) % 3)
                   for i in range(3)] for step in (0, 2, 5, 6)}
    want = {r.id: _alone(engine, r) for group in reqs.values() for r in group}
    budget = slots.gather_budget_bytes
    slots.gather_budget_bytes = budget if gathered else 0
    try:
        gen, out, step = Generator(*engine), {}, 0
        while gen.num_running or step <= max(reqs):
            before = list(gen.running_ids)
            events = gen.step() if gen.num_running else []
            finished = {e.request_id for e in events if e.finished}
            after = list(gen.running_ids)
            if gathered:
                moved = [i for i, rid in enumerate(after) if before[i] != rid]
                assert len(moved) <= len(finished), (before, after)
            else:
                assert [r.request.slot for r in gen.rows] == sorted(r.request.slot for r in gen.rows)
            events += gen.add(reqs.get(step, []))
            if not gathered:
                assert [r.request.slot for r in gen.rows] == sorted(r.request.slot for r in gen.rows)
            for e in events:
                out.setdefault(e.request_id, []).append(e.token_id)
            step += 1
    finally:
        slots.gather_budget_bytes = budget
    assert out == want
