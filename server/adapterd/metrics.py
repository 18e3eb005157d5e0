"""Prometheus metrics: one `Metrics` object per server, on a caller-given registry.

Nothing here is module-global: `create_server` builds a `Metrics(CollectorRegistry())`
and hands it to the components that report (the RPC interceptor, the scheduler, the
adapter cache, the training service). Tests build their own and read it back.

Adapter names come from users, so they cannot be label values as they are: a thousand
adapters would make a thousand series per label set. `TopKLabels` keeps its own label
for the K adapters with the most traffic and folds the rest into "other":

    request for "summarizer"  ->  label "summarizer"   (one of the top K)
    request for "rare-one"    ->  label "other"        (until it earns a place)

An adapter that drops out of the top K has its series removed, so the number of series
stays bounded by (K + 1) per label set however many adapters come and go.

The HTTP endpoint serves /metrics and nothing else (404 on every other path). The series
name tenants and adapters, so the port binds --metrics-host (by default --host, loopback)
and must never be reachable from outside the cluster: see README.md, "Metrics".
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from adapterd_rules import KINDS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app

from adapterd import __version__
from adapterd.tenancy import DEFAULT_TENANT
from adapterd.training.store import STATES as JOB_STATES

OTHER = "other"
BASE = "base"  # the label of requests on the base model (adapter "")
TIERS = ("device", "cpu")

# Buckets, in seconds. Latency on a GPU is milliseconds; on a CPU test box, seconds.
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def adapter_key(adapter: str, tenant: str = DEFAULT_TENANT) -> str:
    """The name an adapter is counted under: "owner/name", no version, and no owner in
    single-tenant mode. `tenant` is the caller's, the owner of a name given without one.

    "" -> "base"; "summarizer@3" of acme -> "acme/summarizer"; "globex/summarizer" ->
    "globex/summarizer"; "summarizer@3" of the default tenant -> "summarizer".
    """
    name = adapter.split("@", 1)[0]
    if not name:
        return BASE
    if "/" not in name:
        name = f"{tenant}/{name}"
    if name.startswith(DEFAULT_TENANT + "/"):
        name = name[len(DEFAULT_TENANT) + 1 :]
    return name


class TopKLabels:
    """Bounded label values: the K keys with the most (recent) traffic keep their own.

    `observe(key)` counts one unit of traffic and may promote the key; `label(key)` only
    looks up (and may take a free slot when `claim_free`). A key replaces the least
    busy labelled one only when its count is more than twice that one's, so two keys of
    similar traffic do not swap places (and lose their series) back and forth. Counts
    are halved every `decay_every` observations, so the ranking follows recent traffic,
    and the table of counts is trimmed to `track` keys, so memory is bounded too.
    """

    def __init__(
        self,
        k: int,
        *,
        on_demote: Callable[[str], None] | None = None,
        decay_every: int = 10_000,
        track: int = 4096,
    ) -> None:
        if k < 0:
            raise ValueError(f"top-K must be >= 0, got {k}")
        self.k = k
        self._on_demote = on_demote
        self._decay_every = decay_every
        self._track = max(track, 2 * k + 2)
        self._counts: dict[str, float] = {}
        self._labelled: set[str] = set()
        self._seen = 0
        self._lock = threading.Lock()

    @property
    def labelled(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._labelled)

    def label(self, key: str, *, claim_free: bool = False) -> str:
        with self._lock:
            if key in self._labelled:
                return key
            if claim_free and len(self._labelled) < self.k:
                self._labelled.add(key)
                return key
            return OTHER

    def observe(self, key: str) -> str:
        demoted = None
        with self._lock:
            self._seen += 1
            count = self._counts.get(key, 0.0) + 1.0
            self._counts[key] = count
            if self._seen % self._decay_every == 0:
                self._decay()
            elif len(self._counts) > self._track:
                self._trim()
            if key not in self._labelled and self.k > 0:
                if len(self._labelled) < self.k:
                    self._labelled.add(key)
                else:
                    weakest = min(self._labelled, key=lambda k: self._counts.get(k, 0.0))
                    if count > 2.0 * self._counts.get(weakest, 0.0):
                        self._labelled.discard(weakest)
                        self._labelled.add(key)
                        demoted = weakest
            label = key if key in self._labelled else OTHER
        if demoted is not None and self._on_demote is not None:
            self._on_demote(demoted)
        return label

    def _decay(self) -> None:
        self._counts = {k: c / 2 for k, c in self._counts.items() if c >= 1.0 or k in self._labelled}

    def _trim(self) -> None:
        keep = sorted(self._counts.items(), key=lambda kv: kv[1], reverse=True)[: self._track // 2]
        counts = dict(keep)
        for k in self._labelled:
            counts.setdefault(k, self._counts.get(k, 0.0))
        self._counts = counts


class Metrics:
    """Every adapterd_* metric, and the methods the components report through.

    The methods never raise on odd input and never block for long: they are called
    from the RPC handlers, the engine thread and the cache alike.
    """

    def __init__(self, registry: CollectorRegistry, *, top_k_adapters: int = 20) -> None:
        self.registry = registry
        self.adapters = TopKLabels(top_k_adapters, on_demote=self._forget_adapter)
        self._series_lock = threading.Lock()
        # adapter label -> (metric, label values) of every series that carries it
        self._series: dict[str, set[tuple[object, tuple[str, ...]]]] = {}
        self._http = None
        r = registry

        self.requests = Counter(
            "adapterd_requests", "Inference requests finished, by gRPC status name.",
            ["adapter", "tenant", "code"], registry=r)
        self.request_duration = Histogram(
            "adapterd_request_duration_seconds", "Inference request time, arrival to last token.",
            ["adapter"], buckets=_DURATION_BUCKETS, registry=r)
        self.rpcs = Counter(
            "adapterd_rpcs", "Every RPC finished, by method and gRPC status name.",
            ["method", "code"], registry=r)
        self.queue_wait = Histogram(
            "adapterd_queue_wait_seconds", "Time a request waited before joining the batch.",
            buckets=_QUEUE_BUCKETS, registry=r)
        self.ttft = Histogram(
            "adapterd_time_to_first_token_seconds", "Arrival to first generated token.",
            ["adapter"], buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "adapterd_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request.",
            ["adapter"], buckets=_TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "adapterd_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generation_tokens = Counter(
            "adapterd_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.queue_depth = Gauge(
            "adapterd_queue_depth", "Requests waiting to join the batch.", registry=r)
        self.batch_size = Gauge(
            "adapterd_running_batch_size", "Rows in the running batch.", registry=r)
        self.resident = Gauge(
            "adapterd_adapters_resident", "Adapters held in each cache tier.", ["tier"], registry=r)
        self.resident_kinds = Gauge(
            "adapterd_adapters_resident_by_kind", "Adapters held in each cache tier, by kind (lora, dora, ia3, "
            "prompt_tuning, prefix_tuning).", ["tier", "kind"], registry=r)
        self.loads = Counter(
            "adapterd_adapter_loads", "Adapters loaded into a tier.", ["tier"], registry=r)
        self.load_duration = Histogram(
            "adapterd_adapter_load_duration_seconds", "Time to load an adapter into a tier.",
            ["tier"], buckets=_LOAD_BUCKETS, registry=r)
        self.load_failures = Counter(
            "adapterd_adapter_load_failures", "Adapter loads that failed, by gRPC status name.",
            ["code"], registry=r)
        self.evictions = Counter(
            "adapterd_adapter_evictions", "Adapters evicted from a tier.", ["tier"], registry=r)
        self.cache_hits = Counter(
            "adapterd_adapter_cache_hits", "Adapter lookups served by a tier.", ["tier"], registry=r)
        self.cache_misses = Counter(
            "adapterd_adapter_cache_misses", "Adapter lookups a tier could not serve.",
            ["tier"], registry=r)
        self.training_jobs = Gauge(
            "adapterd_training_jobs", "Training jobs by state.", ["state"], registry=r)
        self.training_loss = Gauge(
            "adapterd_training_loss", "Last reported training loss of a running job.",
            ["job"], registry=r)
        self.training_step = Gauge(
            "adapterd_training_step", "Last reported step of a running job.", ["job"], registry=r)
        self.auth_failures = Counter(
            "adapterd_auth_failures", "Calls refused by authentication or role.",
            ["reason"], registry=r)
        self.quota_rejections = Counter(
            "adapterd_quota_rejections", "Calls refused by a per-tenant limit.",
            ["tenant", "limit"], registry=r)
        self.kv_blocks = Gauge(
            "adapterd_kv_blocks", "Paged KV cache blocks: held by running rows, cached for prefix reuse "
            "(nobody holds them), free.", ["state"], registry=r)
        self.kv_usage = Gauge(
            "adapterd_kv_cache_usage_ratio", "Fraction of the KV cache's blocks held by running rows.", registry=r)
        self.kv_tokens = Gauge(
            "adapterd_kv_tokens", "Tokens whose keys and values the running rows hold.", registry=r)
        self.prefix_lookups = Counter(
            "adapterd_prefix_cache_lookups", "Full prompt blocks looked up in the prefix cache.", registry=r)
        self.prefix_hits = Counter(
            "adapterd_prefix_cache_hits", "Full prompt blocks found in the prefix cache (hit rate: "
            "hits / lookups).", registry=r)
        # The Gateway API Inference Extension's LoRA signal, with vllm:lora_requests_info's
        # semantics: one series, its labels the adapters of running and waiting requests
        # (comma separated, as the `model` field names them) and the slots; its value the time
        # it was last set, so the endpoint picker takes the newest (deploy/k8s/README.md).
        self.lora_info = Gauge(
            "adapterd_lora_requests_info", "Adapters of running and waiting requests, and max_lora (the "
            "accelerator's adapter slots); the value is the time of the last update.",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self._lora_labels: tuple[str, str, str] | None = None
        self._prefix_totals = (0, 0)  # the engine's totals at the last set_kv()
        self.build_info = Info("adapterd_build", "Versions this server runs.", registry=r)
        self.build_info.info(_build_labels())

        for tier in TIERS:
            for m in (self.resident, self.loads, self.evictions, self.cache_hits, self.cache_misses):
                m.labels(tier)
        for state in JOB_STATES:
            self.training_jobs.labels(state).set(0)

    # --- adapter labels --------------------------------------------------------

    def adapter_label(self, adapter: str, tenant: str = DEFAULT_TENANT, *, claim_free: bool = False) -> str:
        return self.adapters.label(adapter_key(adapter, tenant), claim_free=claim_free)

    def _child(self, metric, *values: str):
        """`metric.labels(*values)`, remembering the series under its adapter label."""
        adapter = values[0]
        if adapter != OTHER:
            with self._series_lock:
                self._series.setdefault(adapter, set()).add((metric, values))
        return metric.labels(*values)

    def _forget_adapter(self, adapter: str) -> None:
        with self._series_lock:
            series = self._series.pop(adapter, set())
        for metric, values in series:
            with contextlib.suppress(KeyError):
                metric.remove(*values)

    # --- RPC layer ---------------------------------------------------------------

    def request_done(self, adapter: str, tenant: str, code: str, duration: float) -> None:
        """One inference request finished with `code` (a grpc.StatusCode name)."""
        key = adapter_key(adapter, tenant)
        # Only served requests earn a label: a flood of unknown names stays in "other".
        label = self.adapters.observe(key) if code == "OK" else self.adapters.label(key)
        self._child(self.requests, label, tenant, code).inc()
        self._child(self.request_duration, label).observe(max(duration, 0.0))

    def rpc_done(self, method: str, code: str) -> None:
        self.rpcs.labels(method, code).inc()

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def quota_rejected(self, tenant: str, limit: str) -> None:
        self.quota_rejections.labels(tenant, limit).inc()

    # --- scheduler -----------------------------------------------------------------

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(max(seconds, 0.0))

    def observe_ttft(self, adapter: str, seconds: float, tenant: str = DEFAULT_TENANT) -> None:
        label = self.adapter_label(adapter, tenant, claim_free=True)
        self._child(self.ttft, label).observe(max(seconds, 0.0))

    def observe_tpot(self, adapter: str, seconds: float, tenant: str = DEFAULT_TENANT) -> None:
        self._child(self.tpot, self.adapter_label(adapter, tenant)).observe(max(seconds, 0.0))

    def count_tokens(self, adapter: str, prompt: int, generated: int, tenant: str = DEFAULT_TENANT) -> None:
        label = self.adapter_label(adapter, tenant, claim_free=True)
        if prompt > 0:
            self._child(self.prompt_tokens, label).inc(prompt)
        if generated > 0:
            self._child(self.generation_tokens, label).inc(generated)

    def request_finished(
        self, adapter: str, *, arrival: float, first_token: float | None, end: float,
        prompt_tokens: int, generated_tokens: int, tenant: str = DEFAULT_TENANT,
    ) -> None:
        """Everything the scheduler knows when a row leaves the batch, in one call.

        Times are `time.monotonic()` readings. TPOT is the mean gap between generated
        tokens after the first, so it needs at least two tokens.
        """
        if first_token is not None:
            self.observe_ttft(adapter, first_token - arrival, tenant)
            if generated_tokens > 1:
                self.observe_tpot(adapter, (end - first_token) / (generated_tokens - 1), tenant)
        self.count_tokens(adapter, prompt_tokens, generated_tokens, tenant)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_batch_size(self, n: int) -> None:
        self.batch_size.set(n)

    def set_lora_info(self, running: Iterable[str], waiting: Iterable[str], max_lora: int) -> None:
        """Adapters ("name@3" or "owner/name@3", as requests resolved them; "" = the base
        model, left out) of the running and the waiting requests."""
        labels = (_adapter_list(running), _adapter_list(waiting), str(max_lora))
        if labels != self._lora_labels:  # one series: the old one goes
            self.lora_info.clear()
            self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())

    def set_kv(self, *, held: int, cached: int, free: int, total: int, reserved: int, tokens: int, lookups: int,
               hits: int) -> None:
        """The paged KV cache now (PagedGenerator.kv_stats); `lookups` and `hits` are totals
        since start. `reserved`: blocks promised to admitted rows, to come from free or cached."""
        for state, n in (("held", held), ("cached", cached), ("free", free)):
            self.kv_blocks.labels(state).set(n)
        self.kv_usage.set(held / max(1, total))
        self.kv_tokens.set(tokens)
        last_lookups, last_hits = self._prefix_totals
        # Totals below the last ones: a new engine counting from 0 (a test's second server).
        self.prefix_lookups.inc(lookups - last_lookups if lookups >= last_lookups else lookups)
        self.prefix_hits.inc(hits - last_hits if hits >= last_hits else hits)
        self._prefix_totals = (lookups, hits)

    # --- adapter cache -----------------------------------------------------------------

    def set_resident(self, tier: str, n: int, kinds: dict[str, int] | None = None) -> None:
        self.resident.labels(tier).set(n)
        for kind in KINDS:
            self.resident_kinds.labels(tier, kind).set((kinds or {}).get(kind, 0))

    def cache_hit(self, tier: str) -> None:
        self.cache_hits.labels(tier).inc()

    def cache_miss(self, tier: str) -> None:
        self.cache_misses.labels(tier).inc()

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        self.loads.labels(tier).inc()
        self.load_duration.labels(tier).observe(max(seconds, 0.0))

    def adapter_load_failed(self, code: str) -> None:
        self.load_failures.labels(code).inc()

    def adapter_evicted(self, tier: str) -> None:
        self.evictions.labels(tier).inc()

    # --- training ------------------------------------------------------------------------

    def set_training_jobs(self, counts: Mapping[str, int]) -> None:
        """Jobs per state; states left out are 0."""
        for state in set(JOB_STATES) | set(counts):
            self.training_jobs.labels(state).set(counts.get(state, 0))

    def training_progress(self, job: str, step: int, loss: float) -> None:
        self.training_step.labels(job).set(step)
        self.training_loss.labels(job).set(loss)

    def training_finished(self, job: str) -> None:
        """Drop the job's loss and step: only running jobs have series."""
        for metric in (self.training_loss, self.training_step):
            with contextlib.suppress(KeyError):
                metric.remove(job)

    # --- exposition --------------------------------------------------------------------

    def start_http_server(self, host: str, port: int) -> int:
        """Serve /metrics (only) on (host, port) from a daemon thread; port 0 picks one.
        Returns the port."""
        if self._http is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

        class Server(_ThreadingServer):
            address_family = family

        httpd = make_server(address[0], port, metrics_only(make_wsgi_app(self.registry)), Server,
                            handler_class=_QuietHandler)
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
        self._http = httpd
        return int(httpd.server_port)

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else int(self._http.server_port)

    def stop_http_server(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


METRICS_PATH = "/metrics"


def metrics_only(app):
    """The WSGI app `app` at METRICS_PATH, and 404 on every other path (405 for a method
    other than GET or HEAD): a scraper finds the metrics, a probe of / finds nothing."""

    def serve(environ, start_response):
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: the metrics are at {METRICS_PATH}\n".encode()]
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"only GET and HEAD\n"]
        return app(environ, start_response)

    return serve


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        """Scrapes are not logged (one line per scrape otherwise, on stderr)."""


# Past this many names a label value is cut: it is a routing hint, not a list of record.
MAX_LORA_NAMES = 64


def _adapter_list(names: Iterable[str]) -> str:
    """"a@1", "acme/b@2", "a@3", "" -> "a,acme/b": no versions (the gateway routes by the
    name a request gives), no base model, no duplicates, sorted."""
    unique = sorted({n.split("@", 1)[0] for n in names if n})
    return ",".join(unique[:MAX_LORA_NAMES])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _build_labels() -> dict[str, str]:
    # Package metadata, not imports: reading torch's version must not import torch.
    return {
        "version": __version__,
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
    }
