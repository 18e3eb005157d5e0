"""The gRPC server: construction (`create_server`) and the process around it (`serve`).

    create_server(config, engine=...) -> (server, port)   tests bind port 0 and call it
    serve(config)                                       `adapterd serve`: load, listen,
                                                        drain on SIGTERM/SIGINT, exit 0

Shutdown, in order: health NOT_SERVING (with --drain-delay, new calls are still served
that long, while balancers notice); new calls refused with UNAVAILABLE; in-flight calls
run to the end of the grace period (`server.stop(grace)` cancels what is left); then the
engine loop stops. A signal during the drain exits at once (status 128 + the signal),
training workers killed first: an operator who sends it again means it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from adapterd import tls
from adapterd.access import AuthInterceptor, MetricsInterceptor
from adapterd.auth import Authenticator, TenantLimiter
from adapterd.config import Config
from adapterd.engine.loop import EngineLoop
from adapterd.engine.model import base_model_dir
from adapterd.engine.parts import load_engine_parts, set_torch_threads
from adapterd.errors import AdapterdError
from adapterd.http.openai import OpenAIApi
from adapterd.http.server import HttpServer, create_app
from adapterd.interceptors import ErrorInterceptor
from adapterd.malloc import tune_malloc
from adapterd.metrics import Metrics
from adapterd.registry.store import RegistryResolver, open_registry
from adapterd.services import adapters, inference, training
from adapterd.services import export as export_service
from adapterd.training import open_jobs
from adapterd.uploads import Uploads

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Lifecycle:
    """Health of every service: NOT_SERVING until the engine is warm, and again from
    `drain()` on. Draining also makes the engine refuse new requests with UNAVAILABLE."""

    def __init__(self, engine: EngineLoop):
        self.engine = engine
        self.health = health.aio.HealthServicer()
        self.services: list[str] = [""]  # "" = the server as a whole
        self._task: asyncio.Task | None = None

    def track(self, services: list[str]) -> None:
        """Start following the engine's readiness (call on the server's event loop)."""
        self.services += services
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        for name in self.services:
            await self.health.set(name, NOT_SERVING)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        self.engine.on_ready(lambda: loop.call_soon_threadsafe(_resolve, ready))
        await ready
        for name in self.services:
            await self.health.set(name, SERVING)

    async def not_serving(self) -> None:
        """NOT_SERVING for good, so balancers stop routing here; calls are still served."""
        if self._task is not None:
            self._task.cancel()
        await self.health.enter_graceful_shutdown()

    async def drain(self) -> None:
        self.engine.drain()
        await self.not_serving()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def interceptor_chain(config: Config, *, metrics: Metrics) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: auth -> metrics -> errors to status codes. Without --auth-file
    there is no auth interceptor: every call is the single tenant (adapterd.tenancy)."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if config.auth.tenants is not None:
        chain.append(AuthInterceptor(Authenticator(config.auth.tenants), metrics))
    return [*chain, MetricsInterceptor(metrics), ErrorInterceptor()]


def make_metrics(config: Config, registry: CollectorRegistry | None = None) -> Metrics:
    """The server's metrics, on `registry` (tests pass their own) or a fresh one."""
    return Metrics(registry or CollectorRegistry(), top_k_adapters=config.metrics.top_adapters)


def make_limiter(config: Config, metrics: Metrics) -> TenantLimiter:
    """Per-tenant limits: one per process, shared by gRPC and HTTP."""
    return TenantLimiter.from_auth(config.auth.tenants, on_reject=metrics.quota_rejected)


def create_http_server(config: Config, *, engine: EngineLoop, limiter: TenantLimiter, metrics: Metrics,
                       registry=None) -> HttpServer:
    """The OpenAI-compatible HTTP API on --http-host/--http-port, with the same tenants,
    tokens and limits as gRPC; `await server.start()` on the serving loop returns its port."""
    api = OpenAIApi(engine, limiter, registry=registry, served_model_name=config.http.served_model_name,
                    metrics=metrics, forget=getattr(engine, "forget_adapter", lambda key: None))
    auth = Authenticator(config.auth.tenants) if config.auth.tenants is not None else None
    app = create_app(api, auth, max_body_bytes=config.http.max_body_bytes, metrics=metrics)
    return HttpServer(app, config.http_host, config.http.port, tls=config.tls,
                      grace_s=config.server.grace_period_s)


def create_server(
    config: Config,
    *,
    engine: EngineLoop,
    registry=None,
    jobs=None,
    metrics: Metrics | None = None,
    metrics_registry: CollectorRegistry | None = None,
    lifecycle: Lifecycle | None = None,
    limiter: TenantLimiter | None = None,
    base_model_dir: Path | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build the server with every service registered; call on the event loop that will run
    it, then `await server.start()`. Returns the server and the bound port (config port 0
    binds a free one). With `registry` and `base_model_dir` (the base model's full-precision
    files), the Export service merges adapters into it. `metrics` defaults to the engine's,
    else a new one on
    `metrics_registry`; the /metrics endpoint is `serve()`'s to start, not this."""
    lifecycle = lifecycle or Lifecycle(engine)
    metrics = metrics or getattr(engine, "metrics", None) or make_metrics(config, metrics_registry)
    limiter = limiter or make_limiter(config, metrics)  # give the HTTP API the same one
    uploads = Uploads(config.uploads)  # pushes and training uploads share the places
    server = grpc.aio.server(interceptors=interceptor_chain(config, metrics=metrics))
    # One line per service: register(server, ...) -> its full name (for health, reflection).
    services: list[Callable[[], str]] = [
        lambda: inference.register(server, engine, limiter),
    ]
    if registry is not None:
        services.append(lambda: adapters.register(server, registry, _registry_resolver(engine), _residence(engine),
                                                  uploads, engine.forget_adapter))
    if jobs is not None:
        services.append(lambda: training.register(server, jobs, limiter, uploads))
    if registry is not None and base_model_dir is not None:
        services.append(lambda: export_service.register(server, registry, base_model_dir))
    names = [register() for register in services]
    health_pb2_grpc.add_HealthServicer_to_server(lifecycle.health, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    lifecycle.track(names)
    if config.tls.enabled:
        creds = tls.server_credentials(config.tls.cert, config.tls.key, config.tls.client_ca)
        port = server.add_secure_port(config.server.address, creds)
    else:
        port = server.add_insecure_port(config.server.address)
    if port == 0:
        raise OSError(f"could not bind {config.server.address}")
    return server, port


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the exit status."""
    metrics = make_metrics(config)
    registry = open_registry(config.registry, max_rank=config.cache.max_rank)
    try:
        await asyncio.to_thread(registry.clean_leftovers)  # also proves the store is reachable
    except AdapterdError as e:
        log.error("the adapter registry cannot be used: %s", e)
        return 1
    if config.model.malloc_tuning and tune_malloc():
        log.info("malloc keeps freed memory for reuse (--no-malloc-tuning: glibc's defaults)")
    threads = set_torch_threads(config.model.torch_threads)
    log.info("torch uses %d CPU thread(s)", threads)
    try:  # a GGUF file is converted here, once; the engine and the training workers load the directory
        base = await asyncio.to_thread(base_model_dir, config.model.base_model)
    except AdapterdError as e:
        log.error("the base model cannot be used: %s", e)
        return 1
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, base_model=base))
    engine = EngineLoop(
        lambda: load_engine_parts(config.model, config.cache),
        RegistryResolver(registry),
        config.scheduler,
        config.cache,
        metrics=metrics,
        engine=config.engine,
    ).start()
    engine.on_ready(lambda: setattr(registry, "spec", engine.cache.spec))  # pushes are checked against it
    jobs = await asyncio.to_thread(open_jobs, config, registry, metrics)
    engine.on_ready(lambda: jobs.set_module_names(engine.cache.spec.linear_shapes))
    jobs.pace(lambda: engine.busy)  # training pauses while requests are served (--training-share)
    lifecycle = Lifecycle(engine)
    limiter = make_limiter(config, metrics)
    server, port = create_server(
        config, engine=engine, registry=registry, jobs=jobs, lifecycle=lifecycle, metrics=metrics, limiter=limiter,
        base_model_dir=base,
    )
    await server.start()
    http = None
    if config.http.enabled:
        http = create_http_server(config, engine=engine, limiter=limiter, metrics=metrics, registry=registry)
        http_port = await http.start()
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if config.tls.enabled else "http",
                 config.http_host, http_port)
    host = config.server.host
    transport = "mTLS" if config.tls.client_ca else "TLS" if config.tls.enabled else "plaintext"
    log.info("listening on %s:%d, %s (health NOT_SERVING until the model is warm)", host, port, transport)
    if config.metrics.port >= 0:
        metrics_host = config.metrics.host or host
        metrics_port = metrics.start_http_server(metrics_host, config.metrics.port)
        log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
    if config.server.port_file is not None:
        _write_atomically(config.server.port_file, f"{port}\n")

    stop = asyncio.Event()
    draining = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if draining.is_set():
            _exit_now(sig, jobs)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    started = asyncio.ensure_future(asyncio.to_thread(engine.wait_ready))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({started, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if started.done() and started.exception() is not None:
        log.error("the engine failed to start: %s", started.exception())
        status = 1
    else:
        if started.done():
            log.info("serving on %s:%d", host, port)
        await stopping
        if engine.ready and config.server.drain_delay_s > 0:
            await lifecycle.not_serving()
            log.info("NOT_SERVING; new calls are still served for %.0f s (--drain-delay)", config.server.drain_delay_s)
            stop.clear()
            again = asyncio.ensure_future(stop.wait())  # a second signal cuts the delay short
            await asyncio.wait({again}, timeout=config.server.drain_delay_s)
            again.cancel()

    log.info("draining: new calls get UNAVAILABLE; in-flight calls have %.0f s (signal again to exit now)",
             config.server.grace_period_s)
    draining.set()
    await lifecycle.drain()
    await asyncio.gather(server.stop(config.server.grace_period_s),
                         http.stop(config.server.grace_period_s) if http is not None else asyncio.sleep(0))
    await asyncio.to_thread(jobs.close)  # running jobs are failed: the server is going away
    await asyncio.to_thread(engine.stop, 30)  # off the loop, which must still see a second signal
    metrics.stop_http_server()
    log.info("stopped")
    return status


def _exit_now(sig: signal.Signals, jobs) -> None:
    """A signal during the drain: stop waiting for anything. Workers run in their own
    sessions (a Ctrl-C at the terminal is not theirs), so they are killed first, or they
    would outlive the server."""
    log.warning("%s while draining: exiting now, in-flight calls are cut off", sig.name)
    jobs.kill_workers()
    logging.shutdown()
    os._exit(128 + sig)


def _registry_resolver(engine: EngineLoop) -> RegistryResolver | None:
    resolver = getattr(engine, "resolver", None)
    return resolver if isinstance(resolver, RegistryResolver) else None


def _residence(engine: EngineLoop) -> Callable[[str], str]:
    """Where an adapter (by cache key) is now: the engine's cache knows once it exists."""
    return lambda key: engine.cache.residence(key) if engine.cache is not None else "storage"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(config: Config) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(config))
