"""Cross-cutting RPC work, as grpc.aio server interceptors.

The chain (outermost first) is auth -> metrics -> errors: see `app.interceptor_chain`.
The error interceptor is the one place where exceptions become status codes: a typed
AdapterdError keeps its code and message; anything else is INTERNAL with a request id
that is also in the server log, so a user can report it and an operator can find it.
It also parses the requests: bytes that are not the method's message (a string field that
is not UTF-8, garbage) are INVALID_ARGUMENT, where grpc itself would answer INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import uuid

import grpc

from adapterd.errors import AdapterdError, InvalidArgument

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A status message is a trailer, and peers refuse large metadata (8 KiB by default): a
# message is cut well below that, whatever it echoes.
MAX_MESSAGE_CHARS = 2000
UNPARSEABLE = (
    "the request could not be parsed as this method's protobuf message: a string field that is not "
    "UTF-8, or bytes that are not a protobuf message; send a message built from adapterd's protos"
)

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("adapterd_request_id", default="-")


def current_request_id() -> str:
    return _request_id.get()


def wrap_behaviors(handler: grpc.RpcMethodHandler, wrap, *, request_deserializer=None) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behavior is `wrap(behavior)`, for any of the four kinds.
    `wrap` must keep the kind: a coroutine function stays one, an async generator too.
    `request_deserializer` replaces the handler's, if given."""
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(getattr(handler, attr)),
        request_deserializer=request_deserializer or handler.request_deserializer,
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
        checked = _checked_stream if handler.request_streaming else _checked_request

        def wrap(behavior):
            if inspect.isasyncgenfunction(behavior):

                async def stream(request, context):
                    token = _request_id.set(_new_id(header_id))
                    try:
                        async for response in behavior(checked(request), context):
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
                    return await behavior(checked(request), context)
                except Exception as e:  # noqa: BLE001 - mapped to a status just below
                    await _abort(context, method, e)
                finally:
                    _request_id.reset(token)

            return unary

        return wrap_behaviors(handler, wrap, request_deserializer=_lenient(handler.request_deserializer))


class _Unparseable:
    """What a request that could not be parsed becomes, for the behavior to refuse."""


def _lenient(deserialize):
    """The handler's deserializer, returning _Unparseable instead of raising."""
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - any parse failure is the caller's bad bytes
            return _Unparseable()

    return parse


def _checked_request(request):
    if isinstance(request, _Unparseable):
        raise InvalidArgument(UNPARSEABLE)
    return request


async def _checked_stream(requests):
    async for request in requests:
        yield _checked_request(request)


def _new_id(header_id: str | None) -> str:
    return header_id[:64] if header_id else uuid.uuid4().hex[:16]


async def _abort(context, method: str, e: Exception) -> None:
    if isinstance(e, (grpc.aio.AbortError, asyncio.CancelledError)):
        raise e  # already a status (context.abort), or the call is gone
    rid = current_request_id()
    if isinstance(e, AdapterdError) and e.code != "INTERNAL":
        log.info("%s -> %s: %s (request id %s)", method, e.code, e, rid)
        await context.abort(grpc.StatusCode[e.code], _clip(str(e)))
    log.error("%s failed (request id %s)", method, rid, exc_info=e)
    detail = str(e) if isinstance(e, AdapterdError) else "internal error"
    await context.abort(grpc.StatusCode.INTERNAL, f"{_clip(detail)} (request id {rid})")


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
