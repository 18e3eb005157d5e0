"""A real adapterd with its OpenAI-compatible HTTP API beside gRPC, for tests: both on
loopback port 0, on one event loop in a background thread, sharing one tenant limiter.

    server = OpenAIServer.start(parts, resolver, registry=..., metrics=...)
    client = server.openai()            # the official openai client, no retries
    server.stop()
"""

from __future__ import annotations

from adapterd.app import create_http_server, create_server, make_limiter, make_metrics
from adapterd.config import HttpConfig

from tests.grpc_harness import RunningServer


class OpenAIServer(RunningServer):
    @classmethod
    def start(cls, parts, resolver, **kw) -> OpenAIServer:
        kw.setdefault("http", HttpConfig(port=0))
        return super().start(parts, resolver, **kw)

    async def _start(self):
        self.metrics = self.engine.metrics or make_metrics(self.config)
        self.limiter = make_limiter(self.config, self.metrics)
        server, port = create_server(self.config, engine=self.engine, lifecycle=self.lifecycle, registry=self.registry,
                                     jobs=self.jobs, metrics=self.metrics, limiter=self.limiter)
        await server.start()
        self.http = create_http_server(self.config, engine=self.engine, limiter=self.limiter, metrics=self.metrics,
                                       registry=self.registry)
        self.http_port = await self.http.start()
        self.base_url = f"http://127.0.0.1:{self.http_port}/v1"
        return server, port

    def openai(self, token: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=token, max_retries=0, timeout=60, **kw)

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.run(self.http.stop(0))
        super().stop()
