"""The gRPC server: construction (`create_server`) and the process around it (`serve`).

    create_server(config, engine=...) -> (server, port)   tests bind port 0 and call it
    serve(config)                                       `adapterd serve`: load, listen,
                                                        drain on SIGTERM/SIGINT, exit 0

Shutdown, in order: health NOT_SERVING and new calls refused with UNAVAILABLE; in-flight
calls run to the end of the grace period (`server.stop(grace)` cancels what is left);
then the engine loop stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapterd.config import Config
from adapterd.engine.loop import EngineLoop, load_engine_parts
from adapterd.interceptors import ErrorInterceptor
from adapterd.registry.cache import DirectoryResolver
from adapterd.services import inference

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

    async def drain(self) -> None:
        self.engine.drain()
        if self._task is not None:
            self._task.cancel()
        await self.health.enter_graceful_shutdown()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def interceptor_chain(config: Config, *, metrics_registry=None) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first: auth -> metrics -> errors to status codes."""
    return [ErrorInterceptor()]


def create_server(
    config: Config,
    *,
    engine: EngineLoop,
    registry=None,
    metrics_registry=None,
    lifecycle: Lifecycle | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build the server with every service registered; call on the event loop that will run
    it, then `await server.start()`. Returns the server and the bound port (config port 0
    binds a free one)."""
    lifecycle = lifecycle or Lifecycle(engine)
    server = grpc.aio.server(interceptors=interceptor_chain(config, metrics_registry=metrics_registry))
    # One line per service: register(server, ...) -> its full name (for health, reflection).
    services: list[Callable[[], str]] = [
        lambda: inference.register(server, engine),
    ]
    names = [register() for register in services]
    health_pb2_grpc.add_HealthServicer_to_server(lifecycle.health, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    lifecycle.track(names)
    port = server.add_insecure_port(config.server.address)
    if port == 0:
        raise OSError(f"could not bind {config.server.address}")
    return server, port


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the exit status."""
    engine = EngineLoop(
        lambda: load_engine_parts(config.model, config.cache),
        DirectoryResolver(config.cache.registry),
        config.scheduler,
        config.cache,
    ).start()
    lifecycle = Lifecycle(engine)
    server, port = create_server(config, engine=engine, lifecycle=lifecycle)
    await server.start()
    host = config.server.host
    log.info("listening on %s:%d (health NOT_SERVING until the model is warm)", host, port)
    if config.server.port_file is not None:
        _write_atomically(config.server.port_file, f"{port}\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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

    log.info("draining: new calls get UNAVAILABLE; in-flight calls have %.0f s", config.server.grace_period_s)
    await lifecycle.drain()
    await server.stop(config.server.grace_period_s)
    engine.stop(timeout=30)
    log.info("stopped")
    return status


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(config: Config) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(config))
