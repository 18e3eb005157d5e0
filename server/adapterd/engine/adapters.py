"""The adapter cache: where an adapter's weights are between the registry and a batch row.

    resolve (RPC handler)      load (thread pool)         activate (engine thread)
    ref -> key + loader  ───►  files -> AdapterWeights ─► CPU tier ──copy──► device slot
                               (read, check; off the       (LRU by        (LRU, pinned while
                                decode step path)           count, bytes)  a request uses it)

Entries are keyed by an identity that changes with the content (the directory resolver
uses the files' stat; the registry uses the sha256 of the files and the version), so a
changed adapter is a new entry, never a stale hit. A failed load is remembered for a while
under its key, so the registry's keys are per version, not per content: the failure (and
its message, which names the adapter) is never given to another tenant that pushed the same
bytes, and a new push is a new key, loaded afresh. Every method except the loaders runs on
the engine thread, which is what makes the single flight simple: only that thread starts
loads, and it starts one per key.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapterd import errors
from adapterd.config import CacheConfig
from adapterd.resolve import AdapterWeights, ModelSpec, ResolvedAdapter

if TYPE_CHECKING:
    from adapterd.engine.lora import LoraSlots
    from adapterd.metrics import Metrics

log = logging.getLogger(__name__)


def weights_nbytes(weights: AdapterWeights) -> int:
    n = sum(a.nbytes + b.nbytes for a, b in weights.tensors.values())
    n += sum(m.nbytes for m in weights.magnitudes.values()) + sum(v.nbytes for v, _ in weights.ia3.values())
    return n + (weights.virtual.nbytes if weights.virtual is not None else 0)


@dataclass
class CacheStats:
    loads: int = 0  # loads started (the single-flight test counts these)
    load_failures: int = 0
    slot_copies: int = 0
    device_evictions: int = 0
    cpu_evictions: int = 0


@dataclass
class _Failure:
    error: errors.AdapterdError
    until: float  # monotonic time after which a new request may try again


class AdapterCache:
    """Device slots (`slots`, a LoraSlots: the tier on the model's device, the accelerator
    where there is one) plus a CPU tier. Engine thread only, except `on_load_done`, which the
    pool calls when a load ends (to wake the engine)."""

    def __init__(
        self, slots: LoraSlots, spec: ModelSpec | None, config: CacheConfig, *,
        on_load_done: Callable[[], None] = lambda: None, metrics: Metrics | None = None,
    ):
        self.metrics = metrics
        self._load_started: dict[str, float] = {}
        self.slots = slots
        self.spec = spec
        self.config = config
        self.stats = CacheStats()
        self._on_load_done = on_load_done
        self._pool = ThreadPoolExecutor(config.load_workers, thread_name_prefix="adapter-load")
        self._free = list(range(slots.num_slots - 1, 0, -1))  # slot 0 is the base model
        self._resident: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recent first
        self._pins: Counter[str] = Counter()
        self._cpu: OrderedDict[str, tuple[AdapterWeights, int]] = OrderedDict()  # key -> (weights, bytes)
        self._cpu_bytes = 0
        self._loading: dict[str, tuple[ResolvedAdapter, Future]] = {}
        self._failed: dict[str, _Failure] = {}

    # --- what the scheduler asks -------------------------------------------------------

    def slot_of(self, key: str) -> int | None:
        return self._resident.get(key)

    def is_ready(self, key: str) -> bool:
        """Weights in the CPU tier: one slot copy away from serving."""
        return key in self._cpu

    def failure(self, key: str) -> errors.AdapterdError | None:
        f = self._failed.get(key)
        if f is None:
            return None
        if time.monotonic() >= f.until:
            del self._failed[key]
            return None
        return f.error

    def virtual_tokens(self, key: str) -> int:
        """The prompt- or prefix-tuning tokens the adapter puts before every prompt (0: none,
        or not known yet)."""
        slot = self._resident.get(key)
        if slot is not None:
            return self.slots.virtual_tokens(slot)
        entry = self._cpu.get(key)
        return entry[0].virtual_tokens if entry is not None else 0

    def can_activate(self) -> bool:
        return bool(self._free) or any(self._pins[k] == 0 for k in self._resident)

    @property
    def resident_keys(self) -> list[str]:
        return list(self._resident)

    def residence(self, key: str) -> str:
        """"device" (in a slot), "cpu" (in the CPU tier) or "storage". Safe from any thread: a
        membership test, so at worst one step stale."""
        return "device" if key in self._resident else "cpu" if key in self._cpu else "storage"

    # --- loads, off the step path -------------------------------------------------------

    def ensure_loading(self, adapter: ResolvedAdapter) -> None:
        """Start loading `adapter` unless it is resident, in the CPU tier, loading, or failed
        recently. At most one load per key is ever in flight, and at most `load_workers` in
        all: the scheduler asks again, in arrival order, when one finishes."""
        key = adapter.key
        if key in self._resident or key in self._cpu or key in self._loading or self.failure(key):
            return
        if len(self._loading) >= self.config.load_workers:
            return
        self.stats.loads += 1
        self._load_started[key] = time.monotonic()
        future = self._pool.submit(adapter.load, self.spec, self.slots.max_rank)
        self._loading[key] = (adapter, future)
        future.add_done_callback(lambda _: self._on_load_done())

    def poll(self, wanted: set[str] = frozenset()) -> None:
        """Move finished loads into the CPU tier; a failed or timed-out load is remembered
        (see `failure`). CPU entries in `wanted` (requests wait for them) are evicted last."""
        now = time.monotonic()
        for key, (adapter, future) in list(self._loading.items()):
            if not future.done():
                if now - self._load_started[key] >= self.config.load_timeout_s:
                    self._abandon(key, adapter, future)
                continue
            del self._loading[key]
            started = self._load_started.pop(key, time.monotonic())
            try:
                weights = future.result()
            except Exception as e:  # noqa: BLE001 - every failure becomes the requests' error
                self._fail(key, adapter.name, e)
                continue
            self._cpu_put(key, weights, wanted)
            self._observe("adapter_loaded", "cpu", time.monotonic() - started)
        self._observe_resident()

    def next_load_deadline(self) -> float | None:
        """When the oldest load in flight times out (monotonic), if any: the engine must
        wake then even if nothing else happens."""
        if not self._loading:
            return None
        return min(self._load_started[k] for k in self._loading) + self.config.load_timeout_s

    def _abandon(self, key: str, adapter: ResolvedAdapter, future: Future) -> None:
        """A load ran past the timeout: fail it. A thread cannot be stopped; its worker stays
        busy until the read returns, and the result is then dropped."""
        del self._loading[key]
        self._load_started.pop(key, None)
        if not future.cancel():  # cancel() only stops a load that has not started
            log.warning("adapter %r: a load worker is stuck reading it; its result will be dropped", adapter.name)
        self._fail(key, adapter.name, errors.Unavailable(
            f"it did not load within {self.config.load_timeout_s:g} s (--adapter-load-timeout); "
            "the adapter store may be unreachable; retry later"
        ))

    # --- slots, on the engine thread between steps --------------------------------------

    def activate(self, adapter: ResolvedAdapter) -> int:
        """Copy a CPU-tier adapter into a slot (free, else the least recently used one no
        request uses). The caller checked `is_ready` and `can_activate`."""
        key = adapter.key
        weights, _ = self._cpu[key]
        self._cpu.move_to_end(key)
        slot = self._take_slot()
        started = time.monotonic()
        try:
            self.slots.load(slot, weights)
        except Exception as e:  # noqa: BLE001 - e.g. a module the server cannot batch
            self.slots.unload(slot)
            self._free.append(slot)
            self._cpu_drop(key)
            raise self._fail(key, adapter.name, e) from e
        self.stats.slot_copies += 1
        self._resident[key] = slot
        self._observe("adapter_loaded", "device", time.monotonic() - started)
        self._observe_resident()
        return slot

    def pin(self, key: str) -> None:
        self._pins[key] += 1
        self._resident.move_to_end(key)

    def unpin(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def pinned(self, key: str) -> int:
        return self._pins[key]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- internals ---------------------------------------------------------------------

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        victim = next(k for k in self._resident if self._pins[k] == 0)
        self.stats.device_evictions += 1
        self._observe("adapter_evicted", "device")
        return self._resident.pop(victim)

    def _cpu_put(self, key: str, weights: AdapterWeights, wanted: set[str]) -> None:
        size = weights_nbytes(weights)
        self._cpu[key] = (weights, size)
        self._cpu_bytes += size
        limit_n, limit_b = self.config.cpu_adapters, self.config.cpu_bytes
        # Evict least recent first, never an entry requests are waiting for: evicting it would
        # only load it again. So the tier can exceed its limits by what the queue waits for.
        for victim in list(self._cpu):
            if len(self._cpu) <= limit_n and self._cpu_bytes <= limit_b:
                return
            if victim == key or victim in wanted:
                continue
            self._cpu_drop(victim)
            self.stats.cpu_evictions += 1
            self._observe("adapter_evicted", "cpu")

    def _cpu_drop(self, key: str) -> None:
        _, size = self._cpu.pop(key, (None, 0))
        self._cpu_bytes -= size

    def _fail(self, key: str, name: str, e: BaseException) -> errors.AdapterdError:
        if isinstance(e, errors.AdapterdError):
            err = type(e)(f"adapter {name!r} could not be loaded: {e}")
        else:
            err = errors.FailedPrecondition(f"adapter {name!r} could not be loaded: {type(e).__name__}: {e}")
        log.warning("%s", err)
        self.stats.load_failures += 1
        self._observe("adapter_load_failed", err.code)
        self._failed[key] = _Failure(err, time.monotonic() + self.config.failed_load_ttl_s)
        return err

    def _observe(self, event: str, *args) -> None:
        if self.metrics is not None:
            getattr(self.metrics, event)(*args)

    def _observe_resident(self) -> None:
        if self.metrics is not None:
            self.metrics.set_resident("device", len(self._resident),
                                      Counter(self.slots.kinds.get(s, "lora") for s in self._resident.values()))
            self.metrics.set_resident("cpu", len(self._cpu), Counter(w.kind for w, _ in self._cpu.values()))
