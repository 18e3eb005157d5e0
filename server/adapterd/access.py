"""The two interceptors at the door: who is calling (auth) and what it cost (metrics).

They run in this order, outermost first: auth -> metrics -> errors -> service. Auth
refuses a call with a terminating handler (the gRPC examples' pattern), so a refused
call never reaches a service; otherwise it sets the caller's Principal in
adapterd.tenancy's contextvar for the service to read. Metrics then times the call and
counts it under the status code the client will see.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from adapterd.auth import Authenticator, check_role, is_open_method
from adapterd.errors import AdapterdError
from adapterd.metrics import Metrics
from adapterd.tenancy import current_principal, reset_principal, set_principal

INFERENCE_METHODS = ("/adapterd.v1.Inference/Generate", "/adapterd.v1.Inference/GenerateStream")

# around(request, context) -> async context manager wrapped around one call's behavior.
# `request` is None for request-streaming methods.
Around = Callable[[Any, grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager]


def _shape(handler: grpc.RpcMethodHandler):
    """(constructor, behavior) for the handler's streaming shape."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler, handler.stream_stream
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler, handler.stream_unary
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler, handler.unary_stream
    return grpc.unary_unary_rpc_method_handler, handler.unary_unary


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same handler, each call of its behavior run inside `around(request, context)`."""
    make, behavior = _shape(handler)
    streaming_request = handler.request_streaming

    if handler.response_streaming:

        async def wrapped(request, context):
            async with around(None if streaming_request else request, context):
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a coroutine that writes with context.write()
                    await result
    else:

        async def wrapped(request, context):
            async with around(None if streaming_request else request, context):
                result = behavior(request, context)
                return await result if asyncio.iscoroutine(result) else result

    return make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _terminating(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str):
    """A handler of the same shape as `handler` that only aborts."""
    make, _ = _shape(handler)

    async def abort(request, context):
        await context.abort(code, details)

    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer token -> Principal; role checked per method. Health and reflection are open."""

    def __init__(self, authenticator: Authenticator, metrics: Metrics | None = None) -> None:
        self._auth = authenticator
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or is_open_method(details.method):
            return handler
        try:
            principal = self._auth.authenticate(_metadata(details, "authorization"))
            check_role(principal, details.method)
        except AdapterdError as e:
            if self._metrics is not None:
                self._metrics.auth_failure(e.code.lower())
            return _terminating(handler, getattr(grpc.StatusCode, e.code), str(e))

        @contextlib.asynccontextmanager
        async def as_principal(_request, _context) -> AsyncIterator[None]:
            token = set_principal(principal)
            try:
                yield
            finally:
                # An async generator may be finalized in another context; the RPC's
                # task ends with the call anyway, so a failed reset loses nothing.
                with contextlib.suppress(ValueError):
                    reset_principal(token)

        return wrap_handler(handler, as_principal)


def status_name(code: object) -> str | None:
    if code is None:
        return None
    name = getattr(code, "name", None)
    if name is not None:
        return name
    try:
        return grpc.StatusCode(code).name  # an int, from some grpc versions
    except ValueError:
        return None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and code; inference ones also by adapter and tenant."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        metrics = self._metrics
        inference = method in INFERENCE_METHODS

        @contextlib.asynccontextmanager
        async def timed(request, context) -> AsyncIterator[None]:
            start = time.monotonic()
            code = "UNKNOWN"
            try:
                yield
                code = status_name(context.code()) or "OK"
            except AdapterdError as e:
                code = e.code
                raise
            except (asyncio.CancelledError, GeneratorExit):
                remaining = context.time_remaining()
                code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                raise
            except BaseException:
                code = status_name(context.code()) or "UNKNOWN"
                raise
            finally:
                metrics.rpc_done(method, code)
                if inference:
                    tenant = current_principal().tenant
                    adapter = getattr(request, "adapter", "")
                    metrics.request_done(adapter, tenant, code, time.monotonic() - start)

        return wrap_handler(handler, timed)
