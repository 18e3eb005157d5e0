"""Streaming: order, agreement with the unary call, and cancellation freeing the row."""

from __future__ import annotations

import grpc
from adapterd_api.v1 import inference_pb2 as pb

from tests.grpc_harness import long_request, request


def test_stream_is_the_unary_response_token_by_token(serve):
    server = serve()
    for adapter in ("", "a0"):
        req = request("Once upon a time", adapter=adapter, max_new_tokens=24, logprobs=True)
        unary = server.inference.Generate(req)
        messages = list(server.inference.GenerateStream(req))
        assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
        assert "".join(m.text for m in messages) == unary.text
        assert [m.completion_tokens for m in messages] == list(range(1, len(messages) + 1))
        assert [lp for m in messages for lp in m.logprobs] == list(unary.logprobs)
        assert len(unary.logprobs) == len(unary.token_ids) == unary.completion_tokens
        # The first message says what serves the request; the last one why it ended.
        assert messages[0].adapter == unary.adapter == (f"{adapter}@1" if adapter else "")
        assert messages[0].prompt_tokens == unary.prompt_tokens == len("Once upon a time")
        assert [m.finish_reason for m in messages[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(messages) - 1)
        assert messages[-1].finish_reason == unary.finish_reason


def test_finish_reasons(serve):
    server = serve()
    out = server.inference.Generate(request("abc", max_new_tokens=5))
    assert out.finish_reason == pb.LENGTH and out.completion_tokens == 5
    full = server.inference.Generate(request("abc", max_new_tokens=30)).text
    stop = next(c for c in full[3:] if c.isprintable() and c.strip())
    cut = server.inference.Generate(request("abc", max_new_tokens=30, stop=[stop]))
    assert cut.finish_reason == pb.STOP
    assert cut.text == full[: full.index(stop)] and stop not in cut.text
    # ignore_eos runs to max_new_tokens whatever the model says.
    long = server.inference.Generate(request("abc", max_new_tokens=200, ignore_eos=True))
    assert long.finish_reason == pb.LENGTH and long.completion_tokens == 200


def test_cancel_frees_the_row_within_a_step(serve):
    server = serve()
    stream = server.inference.GenerateStream(long_request(adapter="a2"))
    for _ in range(3):
        next(stream)
    assert server.engine.stats()["running"] == 1
    stream.cancel()
    server.wait_for(lambda s: s["running"] == 0, timeout=5, what="the cancelled row to go")
    assert stream.code() == grpc.StatusCode.CANCELLED
    # The adapter is no longer pinned, and the server goes on serving.
    assert server.engine.cache.pinned(server.engine.cache.resident_keys[0]) == 0
    assert server.inference.Generate(request("next", adapter="a2", max_new_tokens=3)).completion_tokens == 3
