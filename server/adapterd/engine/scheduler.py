"""Admission: which waiting requests join the running batch at the next step boundary.

Policy, in order of priority:
  1. a request that has waited `max_wait` or longer (oldest first): nothing starves;
  2. requests for the base model or an adapter already in a slot: no copy needed;
  3. requests whose adapter is in the CPU tier, while a slot is free or evictable: the
     adapter with the most waiting requests first, so one slot copy starts the most rows
     (with requests spread over many adapters and few slots, first come first served
     gives batches of one or two rows).
A request whose adapter is still loading waits without holding anything up. When an
overdue request needs a slot and every slot is pinned by running rows, the slot with the
fewest running rows is reserved for it: its adapter takes no new rows until they finish
(within max_new_tokens steps), so the wait stays bounded, while the other slots keep
admitting. (Stopping every slot instead left batches of one or two rows; under load that
made every request overdue, a slow state the server did not leave while the load lasted.)

Runs on the engine thread only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from adapterd.engine.adapters import AdapterCache
from adapterd.errors import AdapterdError
from adapterd.resolve import ResolvedAdapter

if TYPE_CHECKING:
    from adapterd.engine.sampling import SamplingParams


class Sink(Protocol):
    """Where the loop delivers a request's events: the handler's event loop and its queue."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass(eq=False)
class Submission:
    """A request from the time it is queued until its last event."""

    id: str
    adapter: ResolvedAdapter | None  # None = base model
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # monotonic seconds
    deadline: float | None  # monotonic seconds
    sink: Sink  # see loop.py
    slot: int = 0
    pinned: bool = field(default=False)
    on_start: Callable[[], None] | None = None  # called on the engine thread at admission
    tenant: str = "default"  # who asked: metrics count adapters by owner
    first_token: float | None = None  # monotonic seconds, for time-to-first-token

    @property
    def key(self) -> str | None:
        return self.adapter.key if self.adapter is not None else None


class Scheduler:
    def __init__(self, cache: AdapterCache, max_wait_s: float):
        self.cache = cache
        self.max_wait_s = max_wait_s
        self.waiting: list[Submission] = []  # arrival order
        # A row left the batch (and unpinned its adapter) since the last admit(): waiting
        # requests that did not fit then may fit now. The engine must not sleep on that.
        self._released = False

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, sub: Submission) -> None:
        self.waiting.append(sub)

    def take(self, predicate) -> list[Submission]:
        """Remove and return the waiting requests that match."""
        hit = [s for s in self.waiting if predicate(s)]
        if hit:
            self.waiting = [s for s in self.waiting if not predicate(s)]
        return hit

    def prepare(self) -> list[tuple[Submission, AdapterdError]]:
        """Collect finished loads, start the loads waiting requests need. Returns the
        requests whose adapter failed to load, removed from the queue, with their error."""
        wanted = {s.key for s in self.waiting if s.key is not None}
        self.cache.poll(wanted)
        failed: list[tuple[Submission, AdapterdError]] = []
        keep = []
        for s in self.waiting:
            err = self.cache.failure(s.key) if s.key is not None else None
            if err is not None:
                failed.append((s, err))
                continue
            keep.append(s)
            if s.adapter is not None and self.cache.slot_of(s.key) is None and not self.cache.is_ready(s.key):
                self.cache.ensure_loading(s.adapter)
        self.waiting = keep
        return failed

    def admit(
        self, now: float, free_rows: int, fits: Callable[[Submission], bool] | None = None
    ) -> tuple[list[Submission], list[tuple[Submission, AdapterdError]]]:
        """Pick up to `free_rows` requests, copying adapters into slots as needed, and pin
        them. `fits(sub)`, when given, says whether the request's KV fits now (and counts it
        if so): one that does not waits for rows to finish. Returns (admitted, failed): an
        adapter can still fail at its slot copy."""
        self._released = False  # this pass sees every release so far
        if free_rows <= 0 or not self.waiting:
            return [], []
        overdue = [s for s in self.waiting if now - s.arrival >= self.max_wait_s]
        resident = [s for s in self.waiting if s.key is None or self.cache.slot_of(s.key) is not None]
        order = _unique(overdue + resident + _largest_groups_first(self.waiting))
        admitted: list[Submission] = []
        failed: list[tuple[Submission, AdapterdError]] = []
        reserved: str | None = None  # the adapter whose slot is freeing for an overdue request
        for s in order:
            if len(admitted) == free_rows:
                break
            if s.key is None:
                if fits is None or fits(s):
                    admitted.append(s)
                continue
            slot = self.cache.slot_of(s.key)
            if slot is None:
                if not self.cache.is_ready(s.key):
                    continue
                if not self.cache.can_activate():
                    if reserved is None and now - s.arrival >= self.max_wait_s:
                        reserved = self._slot_to_free()
                    continue
            elif s.key == reserved:
                continue  # pinning it again would keep the overdue request's slot from freeing
            if fits is not None and not fits(s):
                continue
            if slot is None:
                try:
                    slot = self.cache.activate(s.adapter)
                except AdapterdError as e:
                    failed.append((s, e))
                    continue
            s.slot = slot
            self.cache.pin(s.key)
            s.pinned = True
            admitted.append(s)
        done = {id(s) for s in admitted} | {id(s) for s, _ in failed}
        if done:
            self.waiting = [s for s in self.waiting if id(s) not in done]
        return admitted, failed

    def _slot_to_free(self) -> str:
        """The resident adapter with the fewest running rows (the first of equals). It takes
        no new rows, so the fewest count over the slots never rises and falls as those rows
        end; the choice moves only to a slot that emptied further, so some slot frees
        within a bounded number of steps."""
        keys = self.cache.resident_keys
        return min(keys, key=self.cache.pinned)

    def release(self, sub: Submission) -> None:
        """The request left the batch (or the queue): its row is free, and its adapter may be
        evicted once nobody uses it."""
        self._released = True
        if sub.pinned:
            self.cache.unpin(sub.key)
            sub.pinned = False

    def admit_pending(self) -> bool:
        """True when requests wait and a row or slot was released since the last admit():
        another admission pass may start them, with no new call or load to wake the engine."""
        return self._released and bool(self.waiting)

    def next_timer(self) -> float | None:
        """The earliest deadline of a waiting request or of a load in flight (monotonic), if any."""
        deadlines = [s.deadline for s in self.waiting if s.deadline is not None]
        load = self.cache.next_load_deadline()
        if load is not None:
            deadlines.append(load)
        return min(deadlines) if deadlines else None


def _largest_groups_first(subs: list[Submission]) -> list[Submission]:
    """`subs` (in arrival order) reordered so the adapter with the most waiting requests
    comes first, then the next: a slot copy then starts as many rows as it can. Ties go to
    the adapter whose oldest request came first (sorted() is stable)."""
    count: dict[str | None, int] = {}
    for s in subs:
        count[s.key] = count.get(s.key, 0) + 1
    first = {}
    for i, s in enumerate(subs):
        first.setdefault(s.key, i)
    return sorted(subs, key=lambda s: (-count[s.key], first[s.key]))


def _unique(subs: list[Submission]) -> list[Submission]:
    seen: set[int] = set()
    out = []
    for s in subs:
        if id(s) not in seen:
            seen.add(id(s))
            out.append(s)
    return out
