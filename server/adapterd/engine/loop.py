"""The engine loop: one thread owns the model and runs every forward, slot copy and batch
change. RPC handlers only validate, enqueue and await.

    handler (asyncio)                          engine thread
    submit() ── validate, resolve ──► inbox ──► scheduler.prepare / admit (between steps)
                                                generator.add (prefill) / step (decode)
    async for event in generation ◄── loop.call_soon_threadsafe ◄── events of the step
    cancel (call gone, deadline) ───► cancels ─► generator.abort within one step

Failures stay with their request: a failed adapter load fails the requests that wanted
it; an exception in a prefill fails that group; an exception in a decode step fails the
rows of that step, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from adapterd import errors
from adapterd.config import CacheConfig, EngineConfig, SchedulerConfig
from adapterd.engine import attention, chat, limits, mixing, nf4cpu
from adapterd.engine.adapters import AdapterCache
from adapterd.engine.chat import Message
from adapterd.engine.generate import Generator, Request, TokenEvent
from adapterd.engine.grammar import GrammarCompiler
from adapterd.engine.kv import KVPool, prefix_salt
from adapterd.engine.limits import GenerateArgs
from adapterd.engine.paged import PagedGenerator
from adapterd.engine.parts import EngineParts
from adapterd.engine.sampling import SamplingParams
from adapterd.engine.scheduler import Scheduler, Submission
from adapterd.resolve import Resolver

log = logging.getLogger(__name__)


# --kv-cache-mb 0 sizes the pool for a full batch of the longest requests, at most this.
AUTO_KV_MAX_BYTES = 2 * 2**30

# The warm-up batch: rows x prompt tokens (capped by --max-batch-size, --max-input-tokens).
WARM_UP_ROWS = 32
WARM_UP_TOKENS = 32


class _Sink:
    """Where a request's events go: an asyncio.Queue on the handler's event loop."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop = loop
        self.queue = queue


class Generation:
    """The handler's side of a submitted request: iterate it for TokenEvents; a failure
    is raised as its typed error. Close it when the call ends, however it ends."""

    def __init__(self, engine: EngineLoop, sub: Submission, queue: asyncio.Queue):
        self._engine = engine
        self._queue = queue
        self.id = sub.id
        self.adapter = sub.adapter.name if sub.adapter is not None else ""
        self.prompt_tokens = len(sub.prompt_ids)
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def close(self) -> None:
        """Frees the request's row at the next step if it is still queued or running."""
        if not self._done:
            self._done = True
            self._engine.cancel(self.id)


class EngineLoop:
    def __init__(
        self,
        parts: EngineParts | Callable[[], EngineParts],
        resolver: Resolver,
        scheduler: SchedulerConfig,
        cache: CacheConfig,
        metrics=None,  # adapterd.metrics.Metrics, or None
        engine: EngineConfig | None = None,
    ):
        self._build = parts if callable(parts) else (lambda: parts)
        self.metrics = metrics
        self.resolver = resolver
        self.config = scheduler
        self.cache_config = cache
        self.engine_config = engine or EngineConfig()
        self.tokenizer = None
        self.grammars: GrammarCompiler | None = None  # structured output, built with the tokenizer
        self.cache: AdapterCache | None = None
        self._sched: Scheduler | None = None
        self._gen: Generator | None = None
        self._running: dict[str, Submission] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        # Shared with the handlers, under _cv: the inbox, cancellations, counters, flags.
        self._cv = threading.Condition()
        self._inbox: list[Submission] = []
        # Every accepted request until its last event: whatever happens, each gets one.
        self._live: dict[str, Submission] = {}
        self._cancels: set[str] = set()
        self._forgets: list[str] = []  # adapter keys whose cached prefix blocks must go
        self._salts: dict[str, set[bytes]] = {}  # adapter key -> prefix salts seen (engine thread)
        self._queued = 0  # inbox + waiting: what --max-queue bounds
        self._kick = False
        self._draining = False  # new submissions refused; queued and running ones go on
        self._stopping = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._ready_callbacks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._main, name="engine-loop", daemon=True)

    # --- lifecycle (any thread) ----------------------------------------------------------

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._start_error is None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded and warm; re-raises a start-up failure."""
        ok = self._ready.wait(timeout)
        if self._start_error is not None:
            raise self._start_error
        return ok

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the engine thread, or now) once the model is warm."""
        with self._cv:
            if not self._ready.is_set():
                self._ready_callbacks.append(callback)
                return
        if self._start_error is None:
            callback()

    def drain(self) -> None:
        """Refuse new submissions with UNAVAILABLE; queued and running requests go on."""
        with self._cv:
            self._draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Fail what is left with UNAVAILABLE and end the thread. Drain first (app.py)."""
        with self._cv:
            self._draining = True
            self._stopping = True
            self._kick = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        s = self.cache.stats if self.cache is not None else None
        return {
            "running": len(self._running),
            "queued": self._queued,
            "loads": s.loads if s else 0,
            "load_failures": s.load_failures if s else 0,
            "slot_copies": s.slot_copies if s else 0,
            "device_evictions": s.device_evictions if s else 0,
            "cpu_evictions": s.cpu_evictions if s else 0,
        }

    # --- the handlers' side (asyncio thread) ---------------------------------------------

    def submit(
        self,
        *,
        tenant: str,
        adapter: str,
        prompt: str = "",
        messages: Sequence[Message] = (),
        args: GenerateArgs,
        deadline: float | None = None,
        on_start: Callable[[], None] | None = None,
        mix: list[tuple[str, float]] = (),
        combination: str = "linear",
    ) -> Generation:
        """Validate and queue a request; raises a typed error at once when it cannot be
        served. Exactly one of `prompt` and `messages` (rendered with the base model's chat
        template). `deadline` is in time.monotonic() seconds; `on_start` is called on the
        engine thread when the request joins the batch. Call from the event loop that will
        iterate the returned Generation."""
        if self._draining:
            raise errors.Unavailable("the server is shutting down; retry on another replica")
        if not self.ready:
            raise errors.Unavailable("the model is not loaded yet; retry shortly")
        prompt, rendered = chat.prompt_text(self.tokenizer, prompt, messages)
        # A rendered conversation holds its special tokens already (BOS too, where the template writes it).
        prompt_ids = self.tokenizer(prompt, add_special_tokens=not rendered)["input_ids"]
        limits.check_prompt(prompt, len(prompt_ids), self.config)
        kw = vars(args).copy()
        fmt = kw.pop("response_format")
        params = limits.sampling_params(
            prompt_tokens=len(prompt_ids), limits=self.config, **kw,
            grammar=self.grammars.compile(fmt) if fmt is not None else None,
        )
        resolved = self._resolve(tenant, adapter, list(mix), combination)
        queue: asyncio.Queue = asyncio.Queue()
        sub = Submission(
            id=uuid.uuid4().hex,
            adapter=resolved,
            prompt_ids=prompt_ids,
            params=params,
            arrival=time.monotonic(),
            deadline=deadline,
            sink=_Sink(asyncio.get_running_loop(), queue),
            on_start=on_start,
            tenant=tenant,
        )
        with self._cv:
            if self._draining:
                raise errors.Unavailable("the server is shutting down; retry on another replica")
            if self._queued >= self.config.max_queue:
                raise errors.ResourceExhausted(
                    f"the request queue is full ({self.config.max_queue} waiting); retry with backoff"
                )
            self._queued += 1
            self._inbox.append(sub)
            self._live[sub.id] = sub
            self._kick = True
            self._cv.notify()
        return Generation(self, sub, queue)

    def _resolve(self, tenant: str, adapter: str, mix: list[tuple[str, float]], combination: str):
        """The request's adapter: one reference, a weighted mix (mixing.py), or none (the base)."""
        if not mix:
            return self.resolver.resolve(tenant, adapter) if adapter else None
        if adapter:
            raise errors.InvalidArgument("set adapter or adapters (a mix), not both")
        mixing.check_mix(mix, combination)
        parts = [mixing.MixPart(self.resolver.resolve(tenant, ref), weight) for ref, weight in mix]
        return mixing.resolved_mix(parts, combination)

    @property
    def busy(self) -> bool:
        """Whether requests are running or waiting (any thread: a racy read, at most one step old)."""
        return bool(self._running) or self._queued > 0 or bool(self._inbox)

    def forget_adapter(self, key: str) -> None:
        """An adapter version was deleted or replaced: drop its cached prefix blocks (any
        thread; done at the next step boundary). Running rows keep the blocks they hold."""
        with self._cv:
            self._forgets.append(key)
            self._kick = True
            self._cv.notify()

    def kv_stats(self) -> dict[str, int] | None:
        """The paged KV cache's blocks and prefix counters (None: the padded engine)."""
        gen = self._gen
        return gen.kv_stats() if isinstance(gen, PagedGenerator) else None

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancels.add(request_id)
            self._kick = True
            self._cv.notify()

    def _wake(self) -> None:
        with self._cv:
            self._kick = True
            self._cv.notify()

    # --- the engine thread ---------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._setup(self._build())
        except BaseException as e:  # noqa: BLE001 - reported through wait_ready / health
            log.exception("engine failed to start")
            self._start_error = e
            self._ready.set()
            return
        with self._cv:
            self._ready.set()
            callbacks, self._ready_callbacks = self._ready_callbacks, []
        for cb in callbacks:
            cb()
        log.info("engine ready: batch %d, %d slots", self.config.max_batch_size, self.cache.slots.num_slots - 1)
        try:
            self._serve()
        except BaseException:
            log.critical("the engine loop died; refusing new requests", exc_info=True)
            raise
        finally:
            with self._cv:
                self._draining = True  # nothing would ever serve what is queued from now on
            self._shutdown()

    def _setup(self, parts: EngineParts) -> None:
        max_pos = getattr(getattr(parts.model, "config", None), "max_position_embeddings", None)
        self.config = self.config.for_model(max_pos)  # unset limits from the model; too high ones refused
        log.info("limits: %d input tokens, %d total tokens per request (base model: %s positions)",
                 self.config.max_input_tokens, self.config.max_total_tokens, max_pos or "unknown")
        self.tokenizer = parts.tokenizer
        self._gen = self._generator(parts, chat.eos_token_ids(parts.model, parts.tokenizer))
        vocab = parts.model.get_output_embeddings().out_features  # the logits' width, >= the tokenizer's
        self.grammars = GrammarCompiler(parts.tokenizer, vocab, self._gen.eos)
        self.cache = AdapterCache(
            parts.slots, parts.spec, self.cache_config, on_load_done=self._wake, metrics=self.metrics
        )
        self._sched = Scheduler(self.cache, self.config.max_wait_ms / 1000)
        self._warm_up()

    def _generator(self, parts: EngineParts, eos: set[int]):
        """The paged engine where the model's attention supports it (or --engine paged), else
        the padded one."""
        cfg = self.engine_config
        paged = cfg.kind == "paged" or (cfg.kind == "auto" and attention.supports_paged(parts.model))
        if cfg.kind == "paged" and not attention.supports_paged(parts.model):
            raise errors.InvalidArgument(
                f"--engine paged: the base model ({type(parts.model).__name__}) does not use transformers' "
                "attention interface; use --engine auto or padded"
            )
        if not paged:
            log.info("engine: padded (the model's attention does not go through the attention interface)")
            return Generator(parts.model, parts.tokenizer, parts.slots, eos_token_ids=eos)
        kv_bytes = cfg.kv_cache_mb * 2**20 or self._auto_kv_bytes(parts.model)
        gen = PagedGenerator(parts.model, parts.tokenizer, parts.slots, kv_cache_bytes=kv_bytes,
                             block_size=cfg.block_size, step_tokens=cfg.max_step_tokens,
                             max_wait_s=self.config.max_wait_ms / 1000, eos_token_ids=eos)
        if gen.capacity_tokens < self.config.max_total_tokens:
            raise errors.InvalidArgument(
                f"--kv-cache-mb {cfg.kv_cache_mb} holds {gen.capacity_tokens} tokens, fewer than one request "
                f"of --max-total-tokens ({self.config.max_total_tokens}): give more memory or lower the limit"
            )
        log.info("engine: paged, %d KV blocks of %d tokens (%.0f MiB), %d tokens a step, attention kernel: %s",
                 gen.blocks.num_blocks, cfg.block_size, gen.pool.nbytes / 2**20, cfg.max_step_tokens,
                 "C" if gen.kernel is not None else "torch")
        return gen

    def _auto_kv_bytes(self, model) -> int:
        per_token = KVPool.bytes_per_token(model)
        want = self.config.max_batch_size * self.config.max_total_tokens * per_token
        return max(min(want, AUTO_KV_MAX_BYTES), self.config.max_total_tokens * per_token + per_token * 64)

    def _fits(self):
        """For one admission pass: whether a request's worst case fits the KV pool beside
        what the pass already promised (None: the padded engine has no pool to fill)."""
        gen = self._gen
        if not isinstance(gen, PagedGenerator):
            return None
        promised = [0]

        def fits(sub: Submission) -> bool:
            virtual = self.cache.virtual_tokens(sub.key) if sub.key is not None else 0
            need = gen.blocks_needed(len(sub.prompt_ids) + virtual, sub.params.max_new_tokens)
            if need + promised[0] > gen.blocks.available:
                return False
            promised[0] += need
            return True

        return fits

    def _warm_up(self) -> None:
        """A full batch through prefill and a few decode steps before the server reports
        SERVING, as TGI warms up with its largest prefill: the first burst of traffic then
        runs as fast as later ones. (With one short request instead, the first large prefill
        on the CPU took 1.7x as long as the next, while the allocator grew its pools.)"""
        ids = self.tokenizer("warm up")["input_ids"] or [0]
        length = min(WARM_UP_TOKENS, self.config.max_input_tokens)
        ids = (ids * (length // len(ids) + 1))[:length]
        rows = min(self.config.max_batch_size, WARM_UP_ROWS)
        params = SamplingParams(max_new_tokens=min(4, self.config.max_total_tokens - length))  # within the limits
        self._gen.add([Request(f"warm-up-{i}", ids, params) for i in range(rows)])
        while self._gen.num_running:
            self._gen.step()
        # The forward above packed the CPU 4-bit weights: from now on call their kernel directly.
        nf4cpu.attach(self._gen.slots.layers.values())

    def _serve(self) -> None:
        while True:
            with self._cv:
                # Sleep only when nothing can change without an outside event (a call, a
                # cancel, a finished load: each sets _kick). Rows that finished in the last
                # step freed rows and slots that waiting requests may need: when the last of
                # them ends, no call may ever come to wake us, so admit once more first.
                if not self._kick and not self._running and not self._sched.admit_pending():
                    self._cv.wait(self._idle_timeout())
                self._kick = False
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
                forgets, self._forgets = self._forgets, []
                if self._stopping:
                    return  # _shutdown fails what is left with UNAVAILABLE
            for sub in inbox:
                self._sched.add(sub)
            for key in forgets:
                for salt in self._salts.pop(key, ()):
                    if isinstance(self._gen, PagedGenerator):
                        self._gen.forget(salt)
            try:
                for sub in inbox:
                    self._observe_arrival(sub)
                self._iterate(cancels)
                if self.metrics is not None:
                    self.metrics.set_queue_depth(self._queued)
                    self.metrics.set_batch_size(len(self._running))
                    self.metrics.set_lora_info(  # the gateway's LoRA signal (metrics.py)
                        (s.adapter.name for s in self._running.values() if s.adapter is not None),
                        (s.adapter.name for s in self._sched.waiting if s.adapter is not None),
                        self.cache_config.gpu_slots)
                    kv = self.kv_stats()
                    if kv is not None:
                        self.metrics.set_kv(**kv)
            except Exception:  # noqa: BLE001 - a bug here must not end the loop for everyone
                log.exception("engine loop iteration failed; failing the running rows")
                self._fail_running(errors.AdapterdError("internal error in the engine; see the server log"))
            self._flush()

    def _idle_timeout(self) -> float | None:
        deadline = self._sched.next_timer()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _iterate(self, cancels: set[str]) -> None:
        now = time.monotonic()
        if cancels:
            self._drop(lambda s: s.id in cancels, errors.Cancelled("the call was cancelled"))
        self._drop(
            lambda s: s.deadline is not None and s.deadline <= now,
            errors.DeadlineExceeded("the deadline expired before generation finished"),
        )
        for sub, err in self._sched.prepare():
            self._fail(sub, err)
        admitted, failed = self._sched.admit(now, self.config.max_batch_size - len(self._running), self._fits())
        for sub, err in failed:
            self._fail(sub, err)
        if admitted:
            self._prefill(admitted)
        if self._running:
            self._decode()

    def _drop(self, predicate, error: errors.AdapterdError) -> None:
        """End waiting and running requests that match `predicate` with `error`."""
        for sub in self._sched.take(predicate):
            self._fail(sub, error)
        hit = [sub_id for sub_id, sub in self._running.items() if predicate(sub)]
        if hit:
            for sub_id in self._gen.abort(hit):
                self._fail(self._running[sub_id], error)

    def _prefill(self, subs: list[Submission]) -> None:
        with self._cv:
            self._queued -= len(subs)
        now = time.monotonic()
        for sub in subs:
            self._running[sub.id] = sub
            if self.metrics is not None:
                self.metrics.observe_queue_wait(now - sub.arrival)
            if sub.on_start is not None:
                try:
                    sub.on_start()
                except Exception:  # noqa: BLE001 - bookkeeping must not fail the request
                    log.exception("on_start callback failed for request %s", sub.id)
        try:
            requests = []
            for s in subs:
                salt = prefix_salt(s.tenant, s.key, s.adapter.name if s.adapter is not None else None)
                if s.key is not None:
                    self._salts.setdefault(s.key, set()).add(salt)
                requests.append(Request(s.id, s.prompt_ids, s.params, s.slot, salt=salt))
            events = self._gen.add(requests)
        except Exception:  # noqa: BLE001 - isolate the request that broke the group
            if len(subs) == 1:
                log.exception("prefill failed for request %s", subs[0].id)
                self._fail(subs[0], errors.AdapterdError("internal error in prefill; see the server log"))
                return
            for sub in subs:
                del self._running[sub.id]
            with self._cv:
                self._queued += len(subs)
            for sub in subs:
                self._prefill([sub])
            return
        self._dispatch(events)

    def _decode(self) -> None:
        try:
            events = self._gen.step()
        except Exception:  # noqa: BLE001 - the batch state cannot be trusted after this
            log.exception("decode step failed; failing its %d rows", len(self._running))
            self._fail_running(errors.AdapterdError("internal error in a decode step; see the server log"))
            return
        self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            sub = self._running.get(ev.request_id)
            if sub is None:
                continue
            if ev.error is not None:
                self._fail(sub, errors.FailedPrecondition(
                    f"{ev.error}{f' with adapter {sub.adapter.name}' if sub.adapter else ''}; the other requests go on"
                ))
                continue
            if sub.first_token is None:
                sub.first_token = now
            self._deliver(sub, ev)
            if ev.finished:
                del self._running[sub.id]
                self._sched.release(sub)
                self._forget(sub)
                self._observe_finished(sub, ev, now)

    # --- metrics (engine thread) ---------------------------------------------------------

    def _observe_arrival(self, sub: Submission) -> None:
        """Count where the request's adapter is now: a slot (device hit), the CPU tier
        (device miss, CPU hit), or only the registry (a miss in both)."""
        m = self.metrics
        if m is None or sub.key is None:
            return
        if self.cache.slot_of(sub.key) is not None:
            m.cache_hit("device")
            return
        m.cache_miss("device")
        if self.cache.is_ready(sub.key):
            m.cache_hit("cpu")
        else:
            m.cache_miss("cpu")

    def _observe_finished(self, sub: Submission, ev: TokenEvent, now: float) -> None:
        if self.metrics is not None:
            self.metrics.request_finished(
                sub.adapter.name if sub.adapter is not None else "",
                tenant=sub.tenant,
                arrival=sub.arrival,
                first_token=sub.first_token,
                end=now,
                prompt_tokens=len(sub.prompt_ids),
                generated_tokens=ev.completion_tokens,
            )

    def _fail(self, sub: Submission, error: errors.AdapterdError) -> None:
        """End one request with `error`, wherever it is (waiting or running)."""
        if self._running.pop(sub.id, None) is None:
            with self._cv:
                self._queued -= 1
        self._sched.release(sub)
        self._forget(sub)
        self._deliver(sub, type(error)(str(error)))  # a fresh instance per request

    def _forget(self, sub: Submission) -> None:
        with self._cv:
            self._live.pop(sub.id, None)

    def _fail_running(self, error: errors.AdapterdError) -> None:
        self._gen.abort_all()
        for sub in list(self._running.values()):
            self._fail(sub, error)

    def _deliver(self, sub: Submission, item) -> None:
        self._outbox.setdefault(sub.sink.loop, []).append((sub.sink.queue, item))

    def _flush(self) -> None:
        """Hand this iteration's events to each event loop in one call."""
        for loop, items in self._outbox.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody listens
                loop.call_soon_threadsafe(_put_all, items)
        self._outbox = {}

    def _shutdown(self) -> None:
        """Give every request still alive its last event (UNAVAILABLE), however the loop
        ended: a drain, or a fatal error."""
        if self._gen is not None:
            self._gen.abort_all()
        with self._cv:
            left, self._live = list(self._live.values()), {}
            self._inbox, self._queued = [], 0
        self._running.clear()
        if self._sched is not None:
            self._sched.waiting.clear()
        error = errors.Unavailable("the server is shutting down; retry on another replica")
        for sub in left:
            self._deliver(sub, type(error)(str(error)))
        self._flush()
        if self.cache is not None:
            self.cache.close()


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
