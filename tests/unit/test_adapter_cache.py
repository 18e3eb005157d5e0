"""The adapter cache and the admission policy, on real LoRA slots of a two-layer module:
LRU by count and bytes, pinning, single-flight loads, failed loads not retried in a loop,
and an overdue request getting its slot while other adapters keep arriving."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from adapterd.config import CacheConfig
from adapterd.engine.adapters import AdapterCache
from adapterd.engine.lora import inject_lora
from adapterd.engine.scheduler import Scheduler, Submission
from adapterd.errors import FailedPrecondition, Unavailable
from adapterd.registry.validate import AdapterWeights
from adapterd.resolve import ResolvedAdapter
from torch import nn

IN, OUT, RANK = 8, 8, 2


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT, bias=False)
        self.v_proj = nn.Linear(IN, OUT, bias=False)


def _weights(seed: int, modules=("q_proj", "v_proj")) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    tensors = {m: (torch.randn(RANK, IN, generator=g), torch.randn(OUT, RANK, generator=g)) for m in modules}
    return AdapterWeights(name=f"w{seed}", sha256=f"{seed:064x}", rank=RANK, alpha=2 * RANK, scaling=2.0,
                          target_modules=list(modules), tensors=tensors, nbytes=0, config={})


BYTES_EACH = 2 * 2 * RANK * IN * 4  # two modules, A and B, float32


class _Loads:
    """Resolved adapters whose loads are counted, and waited for through on_load_done."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.done = threading.Semaphore(0)

    def adapter(self, name: str, seed: int, fail: bool = False) -> ResolvedAdapter:
        def load(spec, max_rank):
            self.count[name] = self.count.get(name, 0) + 1
            if fail:
                raise OSError("unreadable")
            return _weights(seed)

        return ResolvedAdapter(key=f"key-{name}", name=name, load=load)

    def wait(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=10)


def _cache(loads: _Loads, **kw) -> AdapterCache:
    slots = inject_lora(_Tiny(), num_slots=kw.pop("gpu_slots", 2) + 1, max_rank=4)
    return AdapterCache(slots, None, CacheConfig(**kw), on_load_done=loads.done.release)


def _load(cache: AdapterCache, loads: _Loads, *adapters: ResolvedAdapter) -> None:
    """Load each into the CPU tier, in order."""
    for a in adapters:
        cache.ensure_loading(a)
        loads.wait()
        cache.poll()


def test_single_flight_and_tiers():
    loads = _Loads()
    cache = _cache(loads)
    a = loads.adapter("a", 1)
    for _ in range(5):
        cache.ensure_loading(a)
    loads.wait()
    cache.poll()
    assert cache.failure(a.key) is None and cache.is_ready(a.key) and cache.slot_of(a.key) is None
    slot = cache.activate(a)
    assert cache.slot_of(a.key) == slot and loads.count == {"a": 1}
    layer = cache.slots.layers["q_proj"]
    assert torch.equal(layer.lora_a[slot, :RANK], _weights(1).tensors["q_proj"][0])  # slots hold A
    cache.ensure_loading(a)  # resident: nothing to load
    assert cache.stats.loads == 1


def test_cpu_tier_is_lru_by_count_and_by_bytes():
    loads = _Loads()
    cache = _cache(loads, cpu_adapters=2)
    a, b, c = (loads.adapter(n, i) for i, n in enumerate("abc"))
    _load(cache, loads, a, b)
    cache.activate(a)  # a is now the most recently used
    _load(cache, loads, c)
    assert cache.is_ready(a.key) and not cache.is_ready(b.key) and cache.is_ready(c.key)
    assert cache.stats.cpu_evictions == 1

    loads = _Loads()
    cache = _cache(loads, cpu_bytes=2 * BYTES_EACH)
    a, b, c = (loads.adapter(n, i) for i, n in enumerate("abc"))
    _load(cache, loads, a, b, c)
    assert [cache.is_ready(x.key) for x in (a, b, c)] == [False, True, True]


def test_cpu_tier_keeps_what_requests_wait_for():
    loads = _Loads()
    cache = _cache(loads, cpu_adapters=1)
    a, b = loads.adapter("a", 1), loads.adapter("b", 2)
    _load(cache, loads, a)
    cache.ensure_loading(b)
    loads.wait()
    cache.poll(wanted={a.key})
    assert cache.is_ready(a.key) and cache.is_ready(b.key)  # over the count, for now


def test_slots_are_lru_and_pinned_while_used():
    loads = _Loads()
    cache = _cache(loads, gpu_slots=2)
    a, b, c = (loads.adapter(n, i) for i, n in enumerate("abc"))
    _load(cache, loads, a, b, c)
    sa, sb = cache.activate(a), cache.activate(b)
    cache.pin(a.key)
    cache.pin(b.key)
    assert not cache.can_activate()
    cache.unpin(a.key)  # a is free again, b still in use
    assert cache.activate(c) == sa and cache.slot_of(a.key) is None and cache.slot_of(b.key) == sb
    assert cache.stats.device_evictions == 1
    # Evicted from its slot, a is still in the CPU tier: one copy away, no reload.
    cache.unpin(b.key)
    cache.activate(a)
    assert cache.stats.loads == 3 and cache.stats.slot_copies == 4


def test_a_failed_load_is_remembered_not_retried_in_a_loop():
    loads = _Loads()
    cache = _cache(loads, failed_load_ttl_s=60)
    bad = loads.adapter("bad", 1, fail=True)
    cache.ensure_loading(bad)
    loads.wait()
    cache.poll()
    err = cache.failure(bad.key)
    assert isinstance(err, FailedPrecondition) and "'bad' could not be loaded: OSError: unreadable" in str(err)
    for _ in range(10):
        cache.ensure_loading(bad)
    assert loads.count == {"bad": 1}

    loads = _Loads()
    cache = _cache(loads, failed_load_ttl_s=0)  # retried by the next request after the interval
    bad = loads.adapter("bad", 1, fail=True)
    _load(cache, loads, bad)
    assert cache.failure(bad.key) is None
    _load(cache, loads, bad)
    assert loads.count == {"bad": 2}


def test_a_slot_copy_that_fails_frees_the_slot():
    loads = _Loads()
    cache = _cache(loads, gpu_slots=1)
    odd = ResolvedAdapter(key="odd", name="odd", load=lambda spec, r: _weights(3, modules=("k_proj",)))
    cache.ensure_loading(odd)
    loads.wait()
    cache.poll()
    with pytest.raises(Exception, match="'odd' could not be loaded"):
        cache.activate(odd)
    assert cache.failure("odd") is not None and cache.can_activate() and not cache.is_ready("odd")


def _sub(adapter: ResolvedAdapter | None, arrival: float) -> Submission:
    return Submission(id=f"r{arrival}", adapter=adapter, prompt_ids=[1], params=None,
                      arrival=arrival, deadline=None, sink=None)


def _one_slot_two_adapters(first: str, second: str):
    """A cache with one slot, two adapters already in its CPU tier, and a scheduler on it
    whose requests go first after waiting 1 s."""
    loads = _Loads()
    cache = _cache(loads, gpu_slots=1)
    a, b = loads.adapter(first, 1), loads.adapter(second, 2)
    _load(cache, loads, a, b)
    return cache, Scheduler(cache, max_wait_s=1.0), a, b


def test_resident_adapters_first_but_an_overdue_request_gets_its_slot():
    cache, sched, hot, cold = _one_slot_two_adapters("hot", "cold")
    first = _sub(hot, 0.0)
    sched.add(first)
    assert sched.admit(now=0.0, free_rows=4)[0] == [first]  # hot takes the only slot

    # cold arrived first, but hot is resident: hot goes first while cold is not overdue.
    waiting_cold, more_hot = _sub(cold, 0.1), _sub(hot, 0.2)
    sched.add(waiting_cold)
    sched.add(more_hot)
    assert sched.admit(now=0.3, free_rows=4)[0] == [more_hot]

    # Overdue now: no more hot requests join, so the slot frees and cold gets it.
    late_hot = _sub(hot, 1.2)
    sched.add(late_hot)
    assert sched.admit(now=1.5, free_rows=4)[0] == []
    base = _sub(None, 1.3)
    sched.add(base)
    assert sched.admit(now=1.5, free_rows=4)[0] == [base]  # the base model needs no slot
    for s in (first, more_hot):
        sched.release(s)
    assert sched.admit(now=1.6, free_rows=4)[0] == [waiting_cold]
    assert cache.slot_of(cold.key) is not None and cache.slot_of(hot.key) is None
    assert sched.waiting == [late_hot]


def test_an_overdue_request_reserves_the_emptiest_slot_and_the_others_keep_admitting():
    """Two slots pinned by running rows (busy: 3, quiet: 1) and an overdue request for a
    third adapter: only the quiet slot stops taking rows; busy ones still join the batch."""
    loads = _Loads()
    cache = _cache(loads, gpu_slots=2)
    busy, quiet, cold = loads.adapter("busy", 1), loads.adapter("quiet", 2), loads.adapter("cold", 3)
    _load(cache, loads, busy, quiet, cold)
    sched = Scheduler(cache, max_wait_s=1.0)
    running = [_sub(busy, 0.0), _sub(busy, 0.01), _sub(busy, 0.02), _sub(quiet, 0.03)]
    for s in running:
        sched.add(s)
    assert sched.admit(now=0.1, free_rows=8)[0] == running
    late = _sub(cold, 0.2)
    sched.add(late)
    assert sched.admit(now=0.5, free_rows=8)[0] == []  # not overdue, and no slot is free

    more_busy, more_quiet = _sub(busy, 1.3), _sub(quiet, 1.4)
    sched.add(more_busy)
    sched.add(more_quiet)
    assert sched.admit(now=1.5, free_rows=8)[0] == [more_busy]  # quiet's slot is reserved
    sched.release(running[3])  # quiet's last row ends
    assert sched.admit(now=1.6, free_rows=8)[0] == [late]
    assert cache.slot_of(cold.key) is not None and cache.slot_of(quiet.key) is None
    assert cache.slot_of(busy.key) is not None
    assert sched.waiting == [more_quiet]


def test_prepare_starts_one_load_per_adapter_and_fails_waiters_of_a_failed_one():
    loads = _Loads()
    cache = _cache(loads, failed_load_ttl_s=60)
    good, bad = loads.adapter("good", 1), loads.adapter("bad", 2, fail=True)
    sched = Scheduler(cache, max_wait_s=1.0)
    subs = [_sub(good if i % 2 else bad, i) for i in range(6)]
    for s in subs:
        sched.add(s)
    assert sched.prepare() == []
    loads.wait(2)  # both loads are done: the callback that wakes the engine runs after
    failed = sched.prepare()
    assert sorted(s.id for s, _ in failed) == sorted(s.id for s in subs if s.adapter is bad)
    assert loads.count == {"good": 1, "bad": 1}
    admitted, _ = sched.admit(now=0.0, free_rows=8)
    assert admitted == [s for s in subs if s.adapter is good]


def test_loads_in_flight_are_bounded_by_the_workers():
    loads = _Loads()
    cache = _cache(loads, load_workers=2)
    adapters = [loads.adapter(n, i) for i, n in enumerate("abcd")]
    for a in adapters:
        cache.ensure_loading(a)
    assert cache.stats.loads == 2
    loads.wait(2)
    cache.poll()
    for a in adapters:
        cache.ensure_loading(a)
    loads.wait(2)
    cache.poll()
    assert all(cache.is_ready(a.key) for a in adapters) and cache.stats.loads == 4


def test_a_free_slot_goes_to_the_adapter_with_the_most_waiting_requests():
    cache, sched, lone, busy = _one_slot_two_adapters("lone", "busy")
    first_lone = _sub(lone, 0.0)
    busy_subs = [_sub(busy, 0.1 + i / 10) for i in range(3)]
    for s in (first_lone, *busy_subs):
        sched.add(s)
    # lone arrived first, but one slot copy for busy starts three rows.
    assert sched.admit(now=0.5, free_rows=8)[0] == busy_subs
    assert cache.slot_of(busy.key) is not None and sched.waiting == [first_lone]
    # Once overdue, the lone request goes first: no more busy requests join until it ran.
    late_busy = _sub(busy, 1.1)
    sched.add(late_busy)
    assert sched.admit(now=1.2, free_rows=8)[0] == []
    for s in busy_subs:
        sched.release(s)
    assert sched.admit(now=1.3, free_rows=8)[0] == [first_lone]
    assert sched.waiting == [late_busy]


def test_a_hung_load_fails_its_requests_at_the_timeout_and_frees_the_way():
    loads = _Loads()
    cache = _cache(loads, load_timeout_s=0.2, load_workers=1)
    release = threading.Event()

    def hang(spec, max_rank):
        release.wait(10)  # a store that does not answer
        return _weights(7)

    stuck = ResolvedAdapter(key="key-stuck", name="stuck", load=hang)
    sched = Scheduler(cache, max_wait_s=1.0)
    waiting = _sub(stuck, 0.0)
    sched.add(waiting)
    started = time.monotonic()
    assert sched.prepare() == []
    # The engine sleeps until the next timer when nothing else happens: the load's timeout.
    timer = sched.next_timer()
    assert started < timer <= started + 0.2 + 0.05
    while (left := timer - time.monotonic()) > 0:  # the engine's own wait: until its next timer
        time.sleep(left)
    (failed, err), = sched.prepare()
    assert failed is waiting and isinstance(err, Unavailable) and "did not load within 0.2 s" in str(err)
    assert sched.waiting == [] and sched.next_timer() is None and cache.stats.load_failures == 1
    # Not retried in a loop: a new request for it fails at once while the failure lasts.
    again = _sub(stuck, 1.0)
    sched.add(again)
    assert [s for s, _ in sched.prepare()] == [again]
    # The stuck worker returns at last: its result is dropped, and other adapters load.
    release.set()
    loads.wait()
    good = loads.adapter("good", 1)
    _load(cache, loads, good)
    assert cache.is_ready(good.key) and not cache.is_ready(stuck.key)
