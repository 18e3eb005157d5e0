"""OpenAI request bodies -> what the engine takes (GenerateArgs, prompt or messages).

Only the HTTP-specific part is checked here: the JSON types, OpenAI's ranges, and which
parameters exist. Everything the gRPC API checks too (limits, the prompt, stop sequences,
the schema) is checked once, below, by EngineLoop.submit. A parameter this server does not
implement is a 400 naming it: a client must never believe it was applied.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from adapterd.engine.chat import Message
from adapterd.engine.grammar import ResponseFormat
from adapterd.engine.limits import GenerateArgs
from adapterd.engine.sampling import MAX_TOP_LOGPROBS
from adapterd.http.errors import invalid

MAX_N = 16  # choices per request: each is a row of the batch
COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "presence_penalty",
    "frequency_penalty", "user", "stream", "stream_options", "response_format",
    # Extensions, as vLLM names them:
    "top_k", "repetition_penalty", "ignore_eos",
    # adapterd's: a weighted mix of LoRA adapters, with "model" the base model
    "adapters", "combination",
})
CHAT = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETIONS = COMMON | {"prompt", "logprobs", "echo"}
CONTENT_PART_TYPES = ("text",)


@dataclass
class Parsed:
    """One /v1/chat/completions or /v1/completions request."""

    model: str
    prompts: list[str]  # completions: one row group per prompt; chat: [""]
    messages: list[Message]
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: as many as the server's max total tokens leave room for
    logprobs: bool
    args: GenerateArgs = field(repr=False)
    mix: list[tuple[str, float]] = field(default_factory=list)  # (adapter, weight): a mix of LoRA adapters
    combination: str = "linear"


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", "body") from e
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", "body")
    return body


def parse_chat(body: dict) -> Parsed:
    _known(body, CHAT)
    messages = _messages(_get(body, "messages", list, required=True))
    logprobs = bool(_get(body, "logprobs", bool))
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    return _common(body, [""], messages, max_tokens, logprobs, top)


def parse_completion(body: dict) -> Parsed:
    _known(body, COMPLETIONS)
    prompt = _get(body, "prompt", (str, list), required=True)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid("prompt must be a string or a non-empty list of strings (token arrays are not supported)",
                      "prompt")
    if _get(body, "echo", bool):
        raise invalid("echo is not supported; leave it unset or false", "echo")
    logprobs = _int(body, "logprobs", 0, 5)  # the legacy API: N alternatives besides the chosen token
    max_tokens = _int(body, "max_tokens", 1)
    return _common(body, prompts, [], 16 if max_tokens is None else max_tokens, logprobs is not None, logprobs or 0)


def _common(body: dict, prompts: list[str], messages: list[Message], max_tokens: int | None,
            logprobs: bool, top_logprobs: int) -> Parsed:
    model = _get(body, "model", str, required=True)
    _get(body, "user", str)  # accepted, as an end-user id for abuse monitoring; not used
    stream = bool(_get(body, "stream", bool))
    options = _get(body, "stream_options", dict) or {}
    if options and not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    if set(options) - {"include_usage"}:
        raise invalid(f"stream_options.{sorted(set(options) - {'include_usage'})[0]} is not supported",
                      "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage must be a boolean", "stream_options")
    stop = _get(body, "stop", (str, list)) or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise invalid("stop must be a string or a list of strings", "stop")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_k = _int(body, "top_k", -1)
    args = GenerateArgs(
        max_new_tokens=max_tokens or 0,  # filled in by the handler when None
        temperature=1.0 if temperature is None else temperature,  # OpenAI's default
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=max(top_k or 0, 0),  # -1 (vLLM's "none") = 0
        repetition_penalty=_number(body, "repetition_penalty", 0.0, math.inf),
        seed=_int(body, "seed"),
        stop=tuple(stop),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        ignore_eos=bool(_get(body, "ignore_eos", bool)),
        response_format=_response_format(_get(body, "response_format", dict)),
    )
    mix, combination = _mix(body)
    return Parsed(model=model, prompts=prompts, messages=messages, n=_int(body, "n", 1, MAX_N) or 1,
                  stream=stream, include_usage=include_usage, max_tokens=max_tokens, logprobs=logprobs, args=args,
                  mix=mix, combination=combination)


def _mix(body: dict) -> tuple[list[tuple[str, float]], str]:
    """"adapters": [{"adapter": "name@2", "weight": 0.7}, ...] and "combination" (linear, cat)."""
    entries = _get(body, "adapters", list)
    combination = _get(body, "combination", str)
    if entries is None:
        if combination is not None:
            raise invalid("combination is only allowed with adapters", "combination")
        return [], "linear"
    mix = []
    for e in entries:
        if not isinstance(e, dict) or set(e) - {"adapter", "weight"} or not isinstance(e.get("adapter"), str):
            raise invalid('adapters must be a list of {"adapter": name, "weight": number}', "adapters")
        weight = e.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise invalid(f"adapters: the weight of {e['adapter']!r} must be a number", "adapters")
        mix.append((e["adapter"], float(weight)))
    return mix, combination or "linear"


def _response_format(rf: dict | None) -> ResponseFormat | None:
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise invalid("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        return ResponseFormat("json_schema", json.dumps(schema))
    raise invalid(f"response_format.type must be text, json_object or json_schema; got {kind!r}", "response_format")


def _messages(raw: list) -> list[Message]:
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a role and a content", "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"messages[{i}].{sorted(extra)[0]} is not supported", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in CONTENT_PART_TYPES or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}].content[{j}]: only text parts are supported; got {kind!r}",
                                  "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append(Message(m["role"], content))
    return out


def _known(body: dict, allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unsupported parameter: {unknown[0]!r} (this server does not implement it)", unknown[0])


def _get(body: dict, name: str, types, *, required: bool = False):
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"{name} is required", name)
        return None
    if not isinstance(value, types) or (types is not bool and isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise invalid(f"{name} must be of type {names}; got {type(value).__name__}", name)
    return value


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = _get(body, name, int)
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise invalid(f"{name} must be {bounds}; got {value}", name)
    return value


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = _get(body, name, (int, float))
    if value is not None and not lo <= value <= hi:
        raise invalid(f"{name} must be in [{lo:g}, {hi:g}]; got {value}", name)
    return None if value is None else float(value)
