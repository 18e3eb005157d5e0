"""Typed errors -> OpenAI's JSON error shape and HTTP status: the one place for HTTP.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

The same AdapterdError classes the gRPC interceptor maps to status codes map here to the
statuses OpenAI clients act on: 400, 401, 403, 404 (`model_not_found`), 413, 429 (with
Retry-After: the SDKs back off and retry), 503 while draining (also retried). Messages
from below name gRPC's fields (params.max_new_tokens); they are renamed to the HTTP ones.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.responses import JSONResponse

from adapterd import errors

log = logging.getLogger(__name__)

# gRPC status name -> (HTTP status, OpenAI error type)
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "invalid_request_error"),
    "DATA_LOSS": (500, "server_error"),
    "INTERNAL": (500, "server_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
RETRY_AFTER_S = {429: "1", 503: "1"}

# Field names of the engine's messages -> the HTTP request's.
PARAM_NAMES = {
    "params.max_new_tokens": "max_tokens",
    "params.temperature": "temperature",
    "params.top_p": "top_p",
    "params.top_k": "top_k",
    "params.repetition_penalty": "repetition_penalty",
    "params.seed": "seed",
    "params.stop": "stop",
    "params.response_format.json_schema": "response_format",
    "response_format.json_schema": "response_format",
    "response_format.type": "response_format",
}
_FIELD = re.compile(r"(params\.[a-z_.]+)")  # the field a limit names, wherever it is in the message
_PARAM = re.compile(r"^(params\.[a-z_.]+|response_format\.[a-z_]+|prompt|messages)\b")


class RequestTooLarge(errors.ResourceExhausted):
    """The request body is over --http-max-body-bytes."""


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def to_response(e: BaseException) -> JSONResponse:
    status, body = describe(e)
    headers = {"Retry-After": RETRY_AFTER_S[status]} if status in RETRY_AFTER_S else None
    return JSONResponse(body, status_code=status, headers=headers)


def describe(e: BaseException) -> tuple[int, dict]:
    """(HTTP status, body) for an exception; anything untyped is a 500 with an id that is
    also in the server log."""
    if not isinstance(e, errors.AdapterdError):
        rid = uuid.uuid4().hex[:12]
        log.error("HTTP request failed (request id %s)", rid, exc_info=e)
        return 500, error_body(f"internal error (request id {rid}); see the server log", "server_error")
    status, type_ = STATUS.get(e.code, (500, "server_error"))
    message, param = str(e), getattr(e, "param", None)
    m = _FIELD.search(message) or _PARAM.match(message)
    if m is not None and param is None:
        param = PARAM_NAMES.get(m.group(1).rstrip("."), m.group(1))
    for grpc_name, http_name in PARAM_NAMES.items():
        if grpc_name.startswith("params.") and "response_format" not in grpc_name:
            message = message.replace(grpc_name, http_name)
    code = None
    if isinstance(e, (errors.AdapterTooLarge, RequestTooLarge)):
        status = 413
    elif isinstance(e, errors.NotFound) and status == 404:
        code, param = "model_not_found", param or "model"
    elif status == 429:
        code = "rate_limit_exceeded"
    return status, error_body(message, type_, param, code)


def invalid(message: str, param: str) -> errors.InvalidArgument:
    """An InvalidArgument that names the HTTP parameter."""
    e = errors.InvalidArgument(message)
    e.param = param
    return e
