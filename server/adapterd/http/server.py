"""The HTTP server: a Starlette app under uvicorn, on the gRPC server's event loop.

    app = create_app(api, authenticator, max_body_bytes)   routes + auth, errors per request
    server = HttpServer(app, host, port, tls); port = await server.start(); await server.stop(grace)

The same door as gRPC's: without --auth-file every request is the single tenant (admin);
with it, `Authorization: Bearer TOKEN` is checked by the same Authenticator, and the
principal is set in the same contextvar the handlers read. /health is open (probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapterd.auth import Authenticator
from adapterd.errors import AdapterdError
from adapterd.http.errors import RequestTooLarge, invalid, to_response
from adapterd.http.openai import OpenAIApi
from adapterd.http.requests import parse_body
from adapterd.tenancy import reset_principal, set_principal

OPEN_PATHS = ("/health",)


def create_app(api: OpenAIApi, authenticator: Authenticator | None = None, *,
               max_body_bytes: int = 4 * 2**20, metrics=None) -> Starlette:
    async def body_of(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise RequestTooLarge(f"the request body is {size} bytes, over the server's {max_body_bytes}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body_bytes:
                raise RequestTooLarge(f"the request body is over the server's {max_body_bytes} bytes")
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

    def answer(handler):
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                result = await handler(request)
            except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
                return to_response(e)
            return result if isinstance(result, Response) else JSONResponse(result)

        return endpoint

    @answer
    async def chat_completions(request: Request):
        return await api.chat_completions(request, await body_of(request))

    @answer
    async def completions(request: Request):
        return await api.completions(request, await body_of(request))

    @answer
    async def list_models(request: Request):
        return await api.list_models()

    @answer
    async def model(request: Request):
        name = request.path_params["model"]
        if request.method == "DELETE":
            return await api.delete_model(name)
        return await api.get_model(name)

    async def health(request: Request) -> Response:
        ok = api.engine.ready
        return JSONResponse({"status": "ok" if ok else "loading"}, status_code=200 if ok else 503)

    @answer
    async def not_found(request: Request):
        raise invalid(f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, "
                      "/v1/completions", "path")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET", "DELETE"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.add_route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    if authenticator is not None:
        app.add_middleware(AuthMiddleware, authenticator=authenticator, metrics=metrics)
    return app


class AuthMiddleware:
    """Bearer token -> Principal in the tenancy contextvar, or a 401 in OpenAI's shape."""

    def __init__(self, app, authenticator: Authenticator, metrics=None):
        self.app = app
        self.auth = authenticator
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        try:
            principal = self.auth.authenticate(header.decode("latin-1") if header is not None else None)
        except AdapterdError as e:
            if self.metrics is not None:
                self.metrics.auth_failure(e.code.lower())
            return await to_response(e)(scope, receive, send)
        token = set_principal(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            with contextlib.suppress(ValueError):
                reset_principal(token)


class _Server(uvicorn.Server):
    def capture_signals(self):  # the process's signals are app.serve()'s to handle
        return contextlib.nullcontext()


class HttpServer:
    def __init__(self, app, host: str, port: int, *, tls=None, grace_s: float = 30.0):
        self.host, self.port = host, port
        kw = {}
        if tls is not None and tls.enabled:
            kw = dict(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
            if tls.client_ca is not None:
                kw |= dict(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=grace_s, **kw)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind (port 0: a free one) and serve; returns the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host.strip("[]"), self.port))
        sock.listen(128)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {self.host}:{port} stopped at start")
            await asyncio.sleep(0.01)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting; requests in flight get `grace_s` (then they are cancelled)."""
        if self._task is None:
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        self._server.force_exit = grace_s == 0  # no wait for connections to finish
        await self._task
        self._task = None
