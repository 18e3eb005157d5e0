"""The client's retry policy (adapterctl.client.SERVICE_CONFIG) against a fake server that
answers UNAVAILABLE on purpose: idempotent calls are retried, a stream that has already
sent a token is not, and a push is never replayed."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest
from adapterctl.adapters import AdaptersClient
from adapterctl.client import IDEMPOTENT_METHODS, SERVICE_CONFIG, Client
from adapterd_api.v1 import adapters_pb2 as apb
from adapterd_api.v1 import adapters_pb2_grpc as apb_grpc
from adapterd_api.v1 import inference_pb2 as pb
from adapterd_api.v1 import inference_pb2_grpc as pb_grpc


class Flaky(pb_grpc.InferenceServicer, apb_grpc.AdaptersServicer):
    """Fails the first `fail_first` attempts of each call with UNAVAILABLE, as a draining
    replica (or a balancer that lost its upstream) does; counts every attempt."""

    def __init__(self, fail_first: int):
        self.fail_first = fail_first
        self.attempts: dict[str, int] = {}

    def _attempt(self, key: str) -> int:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key]

    def Generate(self, request, context):
        if self._attempt(request.prompt) <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return pb.GenerateResponse(text="ok", completion_tokens=1, finish_reason=pb.LENGTH)

    def GenerateStream(self, request, context):
        attempt = self._attempt(request.prompt)
        if request.prompt.startswith("cut") and attempt <= self.fail_first:
            yield pb.GenerateStreamResponse(text="a", token_ids=[97], completion_tokens=1)
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica lost mid-stream")
        if attempt <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        yield pb.GenerateStreamResponse(text="a", token_ids=[97], completion_tokens=1, finish_reason=pb.LENGTH)

    def PushAdapter(self, request_iterator, context):
        for _ in request_iterator:
            pass
        self._attempt("push")
        context.abort(grpc.StatusCode.UNAVAILABLE, "draining")


@pytest.fixture
def flaky():
    servicer = Flaky(fail_first=2)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    apb_grpc.add_AdaptersServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_service_config_names_only_idempotent_methods():
    names = {(n["service"], n["method"]) for c in json.loads(SERVICE_CONFIG)["methodConfig"] for n in c["name"]}
    assert names == {(s, m) for s, ms in IDEMPOTENT_METHODS.items() for m in ms}
    for never in ("PushAdapter", "DeleteAdapter", "CreateJob", "CancelJob"):
        assert all(m != never for _, m in names)
    policy = json.loads(SERVICE_CONFIG)["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_generate_is_retried_through_unavailable(flaky):
    servicer, addr = flaky
    with Client(addr, timeout=10) as client:
        assert client.generate("g1", adapter="a").text == "ok"
    assert servicer.attempts["g1"] == 3


def test_a_stream_is_retried_only_before_its_first_token(flaky):
    servicer, addr = flaky
    with Client(addr, timeout=10) as client:
        assert [m.text for m in client.generate_stream("s1")] == ["a"]
        assert servicer.attempts["s1"] == 3  # refused twice before anything was sent

        received = []
        with pytest.raises(grpc.RpcError) as e:
            for m in client.generate_stream("cut1"):
                received.append(m)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(received) == 1 and servicer.attempts["cut1"] == 1  # never replayed


def test_push_is_not_retried(flaky):
    servicer, addr = flaky
    with Client(addr, timeout=10) as client, pytest.raises(grpc.RpcError) as e:
        AdaptersClient(client).stub.PushAdapter(iter([apb.PushAdapterRequest()]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts["push"] == 1


def test_retry_can_be_turned_off(flaky):
    servicer, addr = flaky
    with Client(addr, timeout=10, retry=False) as client, pytest.raises(grpc.RpcError) as e:
        client.generate("g2")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts["g2"] == 1
