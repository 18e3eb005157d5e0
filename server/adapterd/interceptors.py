"""Cross-cutting RPC work, as grpc.aio server interceptors.

The chain (outermost first) is auth -> metrics -> errors: see `app.interceptor_chain`.
The error interceptor is the one place where exceptions become status codes: a typed
AdapterdError keeps its code and message; anything else is INTERNAL with a request id
that is also in the server log, so a user can report it and an operator can find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import uuid

import grpc

from adapterd.errors import AdapterdError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("adapterd_request_id", default="-")


def current_request_id() -> str:
    return _request_id.get()


def wrap_behaviors(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behavior is `wrap(behavior)`, for any of the four kinds.
    `wrap` must keep the kind: a coroutine function stays one, an async generator too."""
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(getattr(handler, attr)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Typed errors -> their status code; unexpected exceptions -> INTERNAL + request id."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        header_id = dict(handler_call_details.invocation_metadata or ()).get(REQUEST_ID_HEADER)

        def wrap(behavior):
            if inspect.isasyncgenfunction(behavior):

                async def stream(request, context):
                    token = _request_id.set(_new_id(header_id))
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except Exception as e:  # noqa: BLE001 - mapped to a status just below
                        await _abort(context, method, e)
                    finally:
                        # A cancelled stream is closed from another task's context, where the
                        # token cannot be reset; the call's own context ends with it anyway.
                        with contextlib.suppress(ValueError):
                            _request_id.reset(token)

                return stream

            async def unary(request, context):
                token = _request_id.set(_new_id(header_id))
                try:
                    return await behavior(request, context)
                except Exception as e:  # noqa: BLE001 - mapped to a status just below
                    await _abort(context, method, e)
                finally:
                    _request_id.reset(token)

            return unary

        return wrap_behaviors(handler, wrap)


def _new_id(header_id: str | None) -> str:
    return header_id[:64] if header_id else uuid.uuid4().hex[:16]


async def _abort(context, method: str, e: Exception) -> None:
    if isinstance(e, (grpc.aio.AbortError, asyncio.CancelledError)):
        raise e  # already a status (context.abort), or the call is gone
    rid = current_request_id()
    if isinstance(e, AdapterdError) and e.code != "INTERNAL":
        log.info("%s -> %s: %s (request id %s)", method, e.code, e, rid)
        await context.abort(grpc.StatusCode[e.code], str(e))
    log.error("%s failed (request id %s)", method, rid, exc_info=e)
    detail = str(e) if isinstance(e, AdapterdError) else "internal error"
    await context.abort(grpc.StatusCode.INTERNAL, f"{detail} (request id {rid})")
