"""A real adapterd gRPC server for tests: bound to port 0 on loopback, its asyncio loop in a
background thread, talked to over a real channel with the generated stubs.

    server = RunningServer.start(parts, resolver, scheduler=..., cache=...)
    server.inference.Generate(...)
    server.stop()

`parts` (EngineParts: the loaded model with its slots) can be shared by servers that do not
run at the same time; each server gets its own engine loop, cache and batch.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from adapterd.app import Lifecycle, create_server
from adapterd.config import CacheConfig, Config, SchedulerConfig, ServerConfig
from adapterd.engine.loop import EngineLoop
from adapterd_api.v1 import adapters_pb2_grpc
from adapterd_api.v1 import inference_pb2 as pb
from adapterd_api.v1 import inference_pb2_grpc as pb_grpc

# The tiny test models have max_position_embeddings 512.
TEST_SCHEDULER = SchedulerConfig(max_batch_size=32, max_queue=64, max_input_tokens=64, max_total_tokens=256)


class RunningServer:
    jobs = None  # a JobManager: the Training service is served from it when set

    def __init__(self, engine: EngineLoop, config: Config, registry=None, *, jobs=None):
        self.engine = engine
        self.config = config
        self.registry = registry
        if jobs is not None:
            self.jobs = jobs
        self.lifecycle = Lifecycle(engine)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-loop", daemon=True)
        self._thread.start()
        self.server, self.port = self.run(self._start())
        self.addr = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.addr)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)

    @classmethod
    def start(cls, parts, resolver, *, scheduler: SchedulerConfig = TEST_SCHEDULER,
              cache: CacheConfig | None = None, wait_ready: bool = True, metrics=None,
              registry=None, jobs=None, **config) -> RunningServer:
        """`metrics`: an adapterd.metrics.Metrics for the engine and the server; `config`:
        more Config fields (auth=AuthConfig(...), tls=TlsConfig(...)); `registry`: a Registry
        to serve the Adapters service from (its spec is set to the engine's base model);
        `jobs`: a started JobManager to serve the Training service from (the caller closes it)."""
        cache = cache or CacheConfig(gpu_slots=parts.slots.num_slots - 1, max_rank=parts.slots.max_rank)
        engine = EngineLoop(parts, resolver, scheduler, cache, metrics=metrics).start()
        if wait_ready:
            engine.wait_ready(timeout=60)
        if registry is not None:
            registry.spec = parts.spec
        return cls(engine, Config(server=ServerConfig(port=0), scheduler=scheduler, cache=cache, **config), registry,
                   jobs=jobs)

    async def _start(self):
        server, port = create_server(self.config, engine=self.engine, lifecycle=self.lifecycle, registry=self.registry,
                                     jobs=self.jobs)
        await server.start()
        return server, port

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.channel.close()
        self.run(self.server.stop(0))
        self.engine.stop(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        """Poll engine stats until `predicate(stats)` holds (tests only: the server never polls)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.engine.stats()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; engine stats {self.engine.stats()}")
            time.sleep(0.01)


def request(prompt: str, adapter: str = "", **params) -> pb.GenerateRequest:
    params.setdefault("max_new_tokens", 16)
    return pb.GenerateRequest(adapter=adapter, prompt=prompt, params=pb.GenerationParams(**params))


def long_request(adapter: str = "", max_new_tokens: int = 240) -> pb.GenerateRequest:
    """A request that runs its full max_new_tokens (ignore_eos: the random test models can
    emit EOS early), for tests that need a row to stay busy until they cancel it."""
    return request("keep going", adapter, max_new_tokens=max_new_tokens, ignore_eos=True)
