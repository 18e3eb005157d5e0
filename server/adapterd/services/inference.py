"""The Inference service: take the request, submit it to the engine loop, answer.

Validation, adapter resolution and scheduling live in the engine loop (engine/loop.py);
typed errors become status codes in the error interceptor.
"""

from __future__ import annotations

import time

from adapterd_api.v1 import inference_pb2 as pb
from adapterd_api.v1 import inference_pb2_grpc as pb_grpc

from adapterd.auth import RequestLease, TenantLimiter
from adapterd.engine.chat import Message
from adapterd.engine.grammar import ResponseFormat
from adapterd.engine.limits import GenerateArgs
from adapterd.engine.loop import EngineLoop
from adapterd.errors import InvalidArgument
from adapterd.tenancy import current_principal

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name

FINISH_REASONS = {"length": pb.LENGTH, "stop": pb.STOP, "eos": pb.EOS}


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, engine: EngineLoop, limiter: TenantLimiter | None = None):
        self.engine = engine
        self.limiter = limiter or TenantLimiter()

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        generation, lease = self._submit(request, context)
        out = pb.GenerateResponse(adapter=generation.adapter, prompt_tokens=generation.prompt_tokens)
        text = []
        try:
            async for ev in generation:
                text.append(ev.text)
                out.token_ids.append(ev.token_id)
                if ev.logprob is not None:
                    out.logprobs.append(ev.logprob)
                if ev.top_logprobs is not None:
                    out.top_logprobs.append(_top(ev.top_logprobs))
                out.completion_tokens = ev.completion_tokens
                if ev.finished:
                    out.finish_reason = FINISH_REASONS[ev.finish_reason]
        finally:
            generation.close()
            lease.close(tokens=out.prompt_tokens + out.completion_tokens)
        out.text = "".join(text)
        return out

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        generation, lease = self._submit(request, context)
        first = True
        completion_tokens = 0
        try:
            async for ev in generation:
                msg = pb.GenerateStreamResponse(
                    text=ev.text, token_ids=[ev.token_id], completion_tokens=ev.completion_tokens
                )
                if ev.logprob is not None:
                    msg.logprobs.append(ev.logprob)
                if ev.top_logprobs is not None:
                    msg.top_logprobs.append(_top(ev.top_logprobs))
                if first:
                    msg.adapter, msg.prompt_tokens, first = generation.adapter, generation.prompt_tokens, False
                if ev.finished:
                    msg.finish_reason = FINISH_REASONS[ev.finish_reason]
                completion_tokens = ev.completion_tokens
                yield msg
        finally:
            generation.close()
            lease.close(tokens=generation.prompt_tokens + completion_tokens)

    def _submit(self, request: pb.GenerateRequest, context) -> tuple[object, RequestLease]:
        """Admit the request against its tenant's limits, then queue it. The lease counts
        it as queued until the engine starts it, and must be closed when the call ends."""
        tenant = current_principal().tenant
        lease = self.limiter.admit(tenant)
        remaining = context.time_remaining()
        try:
            generation = self.engine.submit(
                tenant=tenant,
                adapter=request.adapter,
                prompt=request.prompt,
                messages=[Message(m.role, m.content) for m in request.messages],
                mix=[(m.adapter, m.weight) for m in request.adapters],
                combination=request.combination or "linear",
                args=generate_args(request.params),
                deadline=None if remaining is None else time.monotonic() + remaining,
                on_start=lease.running,
            )
        except BaseException:
            lease.close()
            raise
        return generation, lease


def _top(alternatives: tuple[tuple[int, float], ...]) -> pb.TopLogprobs:
    return pb.TopLogprobs(token_ids=[t for t, _ in alternatives], logprobs=[lp for _, lp in alternatives])


def generate_args(p: pb.GenerationParams) -> GenerateArgs:
    return GenerateArgs(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else None,
        top_k=p.top_k,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        ignore_eos=p.ignore_eos,
        response_format=response_format(p.response_format) if p.HasField("response_format") else None,
    )


def response_format(f: pb.ResponseFormat) -> ResponseFormat | None:
    if f.type == pb.ResponseFormat.TYPE_TEXT:
        return None
    if f.type == pb.ResponseFormat.TYPE_JSON_OBJECT:
        return ResponseFormat("json_object")
    if f.type == pb.ResponseFormat.TYPE_JSON_SCHEMA:
        if not f.json_schema:
            raise InvalidArgument("params.response_format.json_schema is empty; give the JSON Schema as JSON text")
        return ResponseFormat("json_schema", f.json_schema)
    raise InvalidArgument(f"params.response_format.type {f.type} is not known")


def register(server, engine: EngineLoop, limiter: TenantLimiter | None = None) -> str:
    pb_grpc.add_InferenceServicer_to_server(InferenceService(engine, limiter), server)
    return SERVICE_NAME
