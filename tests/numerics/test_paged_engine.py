"""The paged engine against the padded one (the reference): each request's greedy tokens
equal its tokens alone, through joins mid-decode, chunked prompts beside decode rows, prefix
hits, aborts, mixed adapters and the base; in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from adapterd.engine.generate import Generator, Request
from adapterd.engine.kv import prefix_salt
from adapterd.engine.lora import inject_lora
from adapterd.engine.model import load_base_model
from adapterd.engine.paged import PagedGenerator
from adapterd.engine.sampling import SamplingParams
from adapterd.registry.validate import read_adapter

GREEDY = SamplingParams(max_new_tokens=12)
KV_BYTES = 8 * 2**20


def _engine(model_factory, adapter_factory, arch: str, dtype=torch.float32):
    base = model_factory(arch)
    model, tokenizer, spec = load_base_model(base, device=torch.device("cpu"), compute_dtype=dtype)
    slots = inject_lora(model, num_slots=3, max_rank=16)
    slots.load(1, read_adapter(adapter_factory(base, arch, seed=21), spec, 16))
    slots.load(2, read_adapter(adapter_factory(base, arch, seed=22, rank=4), spec, 16))
    return model, tokenizer, slots


@pytest.fixture(scope="module")
def llama(model_factory, adapter_factory):
    return _engine(model_factory, adapter_factory, "llama")


def _paged(engine, **kw) -> PagedGenerator:
    model, tokenizer, slots = engine
    kw.setdefault("kv_cache_bytes", KV_BYTES)
    return PagedGenerator(model, tokenizer, slots, **kw)


def _run(gen, schedule: dict[int, list[Request]], abort_at: dict[int, list[str]] | None = None):
    """schedule[step]: requests that join before step `step`."""
    out: dict[str, list[int]] = {}
    step = 0
    while gen.num_running or any(s >= step for s in schedule):
        for rid in (abort_at or {}).get(step, []):
            gen.abort([rid])
        events = gen.add(schedule.get(step, []))
        events += gen.step()
        for e in events:
            assert e.error is None
            out.setdefault(e.request_id, []).append(e.token_id)
        step += 1
    return out


def _reference(engine, req: Request) -> list[int]:
    """The padded engine, the request alone."""
    model, tokenizer, slots = engine
    model.config._attn_implementation = "sdpa"
    for m in model.modules():
        if getattr(m, "config", None) is not None and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "sdpa"
    gen = Generator(model, tokenizer, slots)
    out: list[int] = []
    for e in gen.add([req]) + [e for _ in range(req.params.max_new_tokens) for e in gen.step()]:
        out.append(e.token_id)
    return out


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def test_adapters_differ_first(llama):
    ids = _prompt(20, 0)
    outs = {slot: _reference(llama, Request(f"s{slot}", ids, GREEDY, slot)) for slot in (0, 1, 2)}
    assert len({tuple(v) for v in outs.values()}) == 3, "the adapters must change the tokens"


@pytest.mark.parametrize("step_tokens", [256, 7])
def test_mixed_batch_with_joins_and_chunks_equals_each_alone(llama, step_tokens):
    reqs = {
        0: [Request("long0", _prompt(90, 1), GREEDY, 1), Request("short0", _prompt(5, 2), GREEDY, 0)],
        3: [Request("mid", _prompt(40, 3), GREEDY, 2), Request("long1", _prompt(70, 4), GREEDY, 0)],
        6: [Request("late", _prompt(17, 5), SamplingParams(max_new_tokens=5), 1)],
    }
    got = _run(_paged(llama, step_tokens=step_tokens), reqs)
    for group in reqs.values():
        for r in group:
            assert got[r.id] == _reference(llama, r), r.id


def test_prefix_hit_gives_the_same_tokens_and_skips_the_prefix(llama):
    gen = _paged(llama, block_size=16)
    shared = _prompt(64, 7)
    salt = prefix_salt("t", "k1", "a@1")
    first = Request("first", shared + _prompt(5, 8), GREEDY, 1, salt=salt)
    _run(gen, {0: [first]})
    lookups, hits = gen.blocks.stats.lookups, gen.blocks.stats.hits
    second = Request("second", shared + _prompt(6, 9), GREEDY, 1, salt=salt)
    got = _run(gen, {0: [second]})
    assert gen.blocks.stats.hits - hits == 4  # all four full blocks of the shared prefix
    assert gen.blocks.stats.lookups - lookups == 4
    assert got["second"] == _reference(llama, second)


def test_prefix_never_crosses_adapters_versions_or_tenants(llama):
    gen = _paged(llama, block_size=16)
    shared = _prompt(64, 10)
    base = Request("a", shared + [1, 2, 3], GREEDY, 1, salt=prefix_salt("t", "k1", "a@1"))
    _run(gen, {0: [base]})
    for i, salt in enumerate([prefix_salt("t", "k2", "a@2"), prefix_salt("t", "k1", "b@1"),
                              prefix_salt("u", "k1", "a@1"), prefix_salt("t", None, None)]):
        hits = gen.blocks.stats.hits
        slot = 0 if i == 3 else 2
        r = Request(f"other{i}", shared + [1, 2, 3], GREEDY, slot, salt=salt)
        got = _run(gen, {0: [r]})
        assert gen.blocks.stats.hits == hits, f"salt {i} must not hit"
        assert got[r.id] == _reference(llama, r)


def test_forget_frees_the_blocks_of_a_version(llama):
    gen = _paged(llama, block_size=16)
    salt = prefix_salt("t", "k1", "a@1")
    _run(gen, {0: [Request("a", _prompt(80, 11), GREEDY, 1, salt=salt)]})
    assert gen.blocks.cached >= 5
    free_before = gen.blocks.available
    assert gen.forget(salt) >= 5
    assert gen.blocks.cached == 0
    assert gen.blocks.available == free_before  # evictable blocks became free blocks
    assert gen.blocks.held == 0


def test_abort_mid_batch_leaves_the_others_and_returns_every_block(llama):
    gen = _paged(llama, step_tokens=32)
    reqs = [Request(f"r{i}", _prompt(10 + 15 * i, 20 + i), SamplingParams(max_new_tokens=15), i % 3) for i in range(5)]
    got = _run(gen, {0: reqs}, abort_at={3: ["r1", "r3"]})
    for r in (reqs[0], reqs[2], reqs[4]):
        assert got[r.id] == _reference(llama, r)
    assert gen.blocks.held == 0 and gen.blocks.reserved == 0


@pytest.mark.parametrize("arch", ["phi"])
def test_other_architectures(model_factory, adapter_factory, arch):
    engine = _engine(model_factory, adapter_factory, arch)
    reqs = [Request("x", _prompt(30, 1), GREEDY, 1), Request("y", _prompt(12, 2), GREEDY, 2),
            Request("z", _prompt(21, 3), GREEDY, 0)]
    got = _run(_paged(engine, step_tokens=16), {0: reqs[:2], 2: reqs[2:]})
    for r in reqs:
        assert got[r.id] == _reference(engine, r)


def test_bfloat16(model_factory, adapter_factory):
    engine = _engine(model_factory, adapter_factory, "llama", torch.bfloat16)
    reqs = [Request("x", _prompt(30, 1), GREEDY, 1), Request("y", _prompt(12, 2), GREEDY, 0)]
    gen = _paged(engine, step_tokens=16)
    assert gen.kernel is None  # bf16 takes the torch path
    got = _run(gen, {0: reqs})
    for r in reqs:
        want = _reference(engine, r)
        # bf16 rounding differs between the two attention paths: the first tokens agree
        assert got[r.id][:4] == want[:4]


def test_a_row_with_non_finite_logits_fails_alone(model_factory, adapter_factory):
    """An adapter whose weights overflow (pushed past every check, say) gives NaN or inf
    logits: that request ends with an error while the rows beside it go on unchanged."""
    model, tokenizer, slots = _engine(model_factory, adapter_factory, "llama")
    from adapterd.resolve import AdapterWeights

    huge = {name: (torch.full((4, layer.in_features), 1e30), torch.full((layer.out_features, 4), 1e30))
            for name, layer in slots.layers.items()}
    slots.load(2, AdapterWeights(name="huge", sha256="", rank=4, alpha=4.0, scaling=1.0, target_modules=[],
                                 tensors=huge, nbytes=0, config={}))
    good = Request("good", _prompt(12, 1), GREEDY, 1)
    want = _run(_paged((model, tokenizer, slots)), {0: [good]})["good"]
    gen = _paged((model, tokenizer, slots))
    events = gen.add([Request("bad", _prompt(9, 2), GREEDY, 2), good])
    got = []
    while gen.num_running:
        events += gen.step()
    for e in events:
        if e.request_id == "bad":
            assert e.finished and e.error is not None and "non-finite" in e.error
        else:
            got.append(e.token_id)
    assert got == want
    assert sum(e.request_id == "bad" for e in events) == 1
    assert gen.blocks.held == 0
