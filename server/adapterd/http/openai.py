"""The OpenAI-compatible endpoints: thin, as the gRPC services are.

    POST /v1/chat/completions, /v1/completions   parse (requests.py) -> admit + submit one row
                                                  per choice -> answer whole, or as SSE
    GET  /v1/models, /v1/models/{model}           the base model and the adapters the caller sees
    DELETE /v1/models/{model}                     delete an adapter (a write: user or admin role)

`model` is what gRPC's `adapter` is ("", "name", "name@3", "tenant/name"), or the base
model's name. Each choice is a row of the batch with its own tenant lease, exactly as a
gRPC call; whatever way the HTTP request ends (done, error, client gone) every row is
closed, so a client that disconnects frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapterd import errors
from adapterd.auth import RequestLease, TenantLimiter, check_role
from adapterd.engine import chat
from adapterd.engine.loop import EngineLoop, Generation
from adapterd.http.errors import describe, invalid
from adapterd.http.requests import Parsed, parse_chat, parse_completion
from adapterd.tenancy import current_principal

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclasses.dataclass
class _Row:
    """One choice: its generation, its lease, and what it produced so far."""

    index: int
    prompt: int  # which prompt (completions with a list of prompts)
    generation: Generation
    lease: RequestLease
    text: list[str] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[tuple] = dataclasses.field(default_factory=list)  # per token: its alternatives
    completion_tokens: int = 0
    finish_reason: str | None = None

    def add(self, ev) -> None:
        self.text.append(ev.text)
        self.tokens.append(ev.token_id)
        if ev.logprob is not None:
            self.logprobs.append(ev.logprob)
            self.top.append(ev.top_logprobs or ())
        self.completion_tokens = ev.completion_tokens
        if ev.finished:
            self.finish_reason = FINISH.get(ev.finish_reason, ev.finish_reason)

    def close(self) -> None:
        self.generation.close()
        self.lease.close(tokens=self.generation.prompt_tokens + self.completion_tokens)


class OpenAIApi:
    def __init__(self, engine: EngineLoop, limiter: TenantLimiter, *, registry=None,
                 served_model_name: str | None = None, metrics=None,
                 forget: Callable[[str], None] = lambda key: None):
        self.engine = engine
        self.limiter = limiter
        self.registry = registry
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.forget = forget
        self.created = int(time.time())

    @property
    def base_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        cache = self.engine.cache
        return cache.spec.name if cache is not None else "base"

    # --- generation ----------------------------------------------------------------------

    async def chat_completions(self, request: Request, body: dict) -> Response:
        return await self._generate(request, parse_chat(body), chat_api=True)

    async def completions(self, request: Request, body: dict) -> Response:
        return await self._generate(request, parse_completion(body), chat_api=False)

    async def _generate(self, request: Request, req: Parsed, *, chat_api: bool) -> Response:
        tenant = current_principal().tenant
        start, code = time.monotonic(), "OK"
        rows = self._submit(tenant, req)
        try:
            first = await _until_disconnected(request, asyncio.gather(*(_first(r) for r in rows)))
            reply = _Reply(self, req, rows, chat_api)
        except BaseException as e:
            code = e.code if isinstance(e, errors.AdapterdError) else "CANCELLED"
            for r in rows:
                r.close()
            self._count(req.model, tenant, code, start)
            raise
        if req.stream:
            return StreamingResponse(self._streamed(reply, first, tenant, start),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await _until_disconnected(request, asyncio.gather(*(_rest(r, ev) for r, ev in zip(rows, first, strict=True))))
        except BaseException as e:
            code = e.code if isinstance(e, errors.AdapterdError) else "CANCELLED"
            raise
        finally:
            for r in rows:
                r.close()
            self._count(req.model, tenant, code, start)
        return JSONResponse(reply.whole())

    def _submit(self, tenant: str, req: Parsed) -> list[_Row]:
        """Admit and queue one row per (prompt, choice); on any failure, none stays queued."""
        adapter = "" if req.model in ("", self.base_name) else req.model
        if req.mix and adapter:
            raise invalid(f"with adapters (a mix), model must be the base model {self.base_name!r}; got {req.model!r}",
                          "model")
        rows: list[_Row] = []
        try:
            for p, prompt in enumerate(req.prompts):
                args = req.args
                if req.max_tokens is None:
                    args = dataclasses.replace(args, max_new_tokens=self._room(prompt, req.messages))
                for j in range(req.n):
                    seed = None if args.seed is None else args.seed + j  # n seeded choices differ, reproducibly
                    lease = self.limiter.admit(tenant)
                    try:
                        generation = self.engine.submit(
                            tenant=tenant, adapter=adapter, prompt=prompt, messages=req.messages,
                            args=dataclasses.replace(args, seed=seed), on_start=lease.running,
                            mix=req.mix, combination=req.combination,
                        )
                    except BaseException:
                        lease.close()
                        raise
                    rows.append(_Row(len(rows), p, generation, lease))
        except BaseException:
            for r in rows:
                r.close()
            raise
        return rows

    def _room(self, prompt: str, messages) -> int:
        """max_tokens unset: what the server's max total tokens leave after the prompt."""
        tok = self.engine.tokenizer
        if tok is None:
            raise errors.Unavailable("the model is not loaded yet; retry shortly")
        text, rendered = chat.prompt_text(tok, prompt, messages)
        used = len(tok(text, add_special_tokens=not rendered)["input_ids"])
        return max(1, self.engine.config.max_total_tokens - used)

    async def _streamed(self, reply: _Reply, first: list, tenant: str, start: float) -> AsyncIterator[str]:
        code = "OK"
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(r, ev, queue)) for r, ev in zip(reply.rows, first, strict=True)]
        try:
            for chunk in reply.opening():
                yield _sse(chunk)
            left = len(pumps)
            while left:
                row, ev = await queue.get()
                if ev is None:
                    left -= 1
                    continue
                if isinstance(ev, BaseException):
                    raise ev
                row.add(ev)
                yield _sse(reply.chunk(row, ev))
            if reply.req.include_usage:
                yield _sse(reply.usage_chunk())
        except errors.AdapterdError as e:
            code = e.code
            yield _sse(describe(e)[1])
        except BaseException:
            code = "CANCELLED"  # the client went away: Starlette cancels the stream
            raise
        finally:
            for p in pumps:
                p.cancel()
            for r in reply.rows:
                r.close()
            self._count(reply.req.model, tenant, code, start)
        yield "data: [DONE]\n\n"

    def _count(self, model: str, tenant: str, code: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.request_done("" if model == self.base_name else model, tenant, code,
                                      time.monotonic() - start)

    # --- models --------------------------------------------------------------------------

    async def list_models(self) -> dict:
        tenant = current_principal().tenant
        data = [self._base_card()]
        if self.registry is not None:
            token = ""
            while True:
                page, token = await asyncio.to_thread(self.registry.list, tenant, page_size=1000, page_token=token)
                data += [self._card(v, tenant) for v in page]
                if not token:
                    break
        return {"object": "list", "data": data}

    async def get_model(self, model: str) -> dict:
        if model in ("", self.base_name):
            return self._base_card()
        return self._card(await self._resolve(model), current_principal().tenant)

    async def delete_model(self, model: str) -> dict:
        principal = current_principal()
        check_role(principal, "DeleteAdapter")
        if model in ("", self.base_name):
            raise invalid("the base model cannot be deleted; name an adapter", "model")
        await self._resolve(model)
        deleted = await asyncio.to_thread(self.registry.delete, principal.tenant, model)
        from adapterd.registry.store import cache_key

        for v in deleted:
            self.forget(cache_key(v))
        return {"id": model, "object": "model", "deleted": bool(deleted)}

    async def _resolve(self, model: str):
        if self.registry is None:
            raise errors.NotFound(f"model {model!r} not found: this server has no adapter registry")
        return await asyncio.to_thread(self.registry.get, current_principal().tenant, model)

    def _base_card(self) -> dict:
        name = self.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "adapterd",
                "root": name, "parent": None}

    def _card(self, v, tenant: str) -> dict:
        """An adapter as vLLM shows a LoRA: parent = the base model; root = what it is, here
        the exact version "tenant/name@N" that `id` resolves to now."""
        return {"id": v.name if v.tenant == tenant else f"{v.tenant}/{v.name}", "object": "model",
                "created": int(v.created_at), "owned_by": v.tenant, "root": v.full_ref,
                "parent": self.base_name, "version": v.version, "source": v.source}


class _Reply:
    """The response bodies of one request, whole or as chunks."""

    def __init__(self, api: OpenAIApi, req: Parsed, rows: list[_Row], chat_api: bool):
        self.api, self.req, self.rows, self.chat = api, req, rows, chat_api
        self.id = ("chatcmpl-" if chat_api else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        served = rows[0].generation.adapter if rows else ""
        self.model = served or api.base_name  # what served it: "name@3", or the base model
        self.object = "chat.completion" if chat_api else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        prompt = sum(r.generation.prompt_tokens for r in self.rows if r.index % self.req.n == 0)
        completion = sum(r.completion_tokens for r in self.rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, tokens: list[int], logprobs: list[float], top: list[tuple]):
        """OpenAI's logprobs object: chat's `content` list, or the legacy completions arrays
        (top_logprobs there: one {token text: logprob} object per position)."""
        if not self.req.logprobs:
            return None
        tok = self.api.engine.tokenizer
        texts = [tok.decode([t]) for t in tokens]
        alternatives = [[(tok.decode([t]), lp) for t, lp in alt] for alt in top]
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                                 "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())}
                                                  for a, alp in alt]}
                                for s, lp, alt in zip(texts, logprobs, alternatives, strict=False)]}
        return {"tokens": texts, "token_logprobs": logprobs, "text_offset": None,
                "top_logprobs": [dict(alt) for alt in alternatives] if self.req.args.top_logprobs else None}

    def whole(self) -> dict:
        choices = []
        for r in self.rows:
            text = "".join(r.text)
            choice = {"index": r.index, "finish_reason": r.finish_reason,
                      "logprobs": self._logprobs(r.tokens, r.logprobs, r.top)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {**self._head(self.object), "choices": choices, "usage": self.usage()}

    def opening(self) -> list[dict]:
        """Chat streams open each choice with the assistant role, as OpenAI does."""
        if not self.chat:
            return []
        return [self._chunk_of(r, {"role": "assistant", "content": ""}, None, None) for r in self.rows]

    def chunk(self, row: _Row, ev) -> dict:
        lp = self._logprobs([ev.token_id], [ev.logprob] if ev.logprob is not None else [],
                            [ev.top_logprobs or ()] if ev.logprob is not None else [])
        reason = FINISH.get(ev.finish_reason, ev.finish_reason) if ev.finished else None
        return self._chunk_of(row, {"content": ev.text} if self.chat else ev.text, reason, lp)

    def _chunk_of(self, row: _Row, delta, reason, logprobs) -> dict:
        choice = {"index": row.index, "logprobs": logprobs, "finish_reason": reason}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.req.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _first(row: _Row):
    """The row's first event, so that a failure before any token (an adapter that does not
    load, a full queue) is the response's status, not an error inside a 200 stream."""
    async for ev in row.generation:
        return ev
    return None


async def _rest(row: _Row, first) -> None:
    if first is None:
        return
    row.add(first)
    if first.finished:
        return
    async for ev in row.generation:
        row.add(ev)


async def _pump(row: _Row, first, queue: asyncio.Queue) -> None:
    try:
        if first is not None:
            await queue.put((row, first))
            if not first.finished:
                async for ev in row.generation:
                    await queue.put((row, ev))
    except errors.AdapterdError as e:
        await queue.put((row, e))
    await queue.put((row, None))


async def _until_disconnected(request: Request, work):
    """Await `work`, or cancel it when the client disconnects first (Starlette only
    notices a disconnect while it is sending; a whole response sends at the end)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise errors.Cancelled("the client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
