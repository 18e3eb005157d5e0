"""The adapterd client library: a channel to the server and one method per RPC used here.

Needs only grpcio and protobuf (no torch, no grpcio-health-checking): the standard health
messages are built from their descriptor in a private pool below.

    with Client("localhost:50051") as c:
        print(c.generate("hello", adapter="support-bot", max_new_tokens=32).text)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import grpc
from adapterd_api.v1 import inference_pb2 as pb
from adapterd_api.v1 import inference_pb2_grpc as pb_grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DEFAULT_ADDR = "localhost:50051"
ADDR_ENV = "ADAPTERD_ADDR"
TOKEN_ENV = "ADAPTERD_TOKEN"
# Generate calls carry the adapter name in this metadata too, so a gRPC-aware load balancer
# can hash on it and keep each adapter on one replica (deploy/README.md, "Routing by adapter").
ADAPTER_HEADER = "adapterd-adapter"

Messages = Sequence[tuple[str, str]]  # (role, content): "system", "user" or "assistant"

# Calls that may run twice without harm are retried when a replica is gone or draining
# (UNAVAILABLE): gRPC's own retry policy, which also fails over behind a load balancer
# (deploy/local/README.md). gRPC commits a call once the response headers arrive, and the
# server sends them with the first token, so a GenerateStream that has streamed anything is
# never replayed. Pushes, deletes, job creation and cancellation are not retried here.
IDEMPOTENT_METHODS = {
    "adapterd.v1.Inference": ("Generate", "GenerateStream"),
    "adapterd.v1.Adapters": ("ListAdapters", "GetAdapter", "GetPushRules"),
    "adapterd.v1.Training": ("GetJob", "ListJobs", "WatchJob"),
    "grpc.health.v1.Health": ("Check",),
}
# Five attempts (gRPC's maximum), 0.1 s growing to 1 s between them (each jittered down):
# about 1.5 s in all, enough for a balancer to notice a dead replica. No retry throttling:
# a replica killed under load fails all its calls at once, and a token bucket would let
# only the first few of them retry.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": svc, "method": m} for svc, methods in IDEMPOTENT_METHODS.items() for m in methods],
        "retryPolicy": RETRY_POLICY,
    }]
})


def default_addr() -> str:
    return os.environ.get(ADDR_ENV) or DEFAULT_ADDR


class Client:
    """One channel to adapterd. `credentials` (TLS) and `metadata` (e.g. a bearer token)
    apply to every call. `retry=False` turns off the retry policy (SERVICE_CONFIG)."""

    def __init__(
        self,
        addr: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        retry: bool = True,
    ):
        self.addr = addr or default_addr()
        self.metadata = tuple(metadata)
        self.timeout = timeout
        options = [("grpc.service_config", SERVICE_CONFIG)] if retry else [("grpc.enable_retries", 0)]
        if credentials is None:
            self.channel = grpc.insecure_channel(self.addr, options=options)
        else:
            self.channel = grpc.secure_channel(self.addr, credentials, options=options)
        self.inference = pb_grpc.InferenceStub(self.channel)

    @classmethod
    def from_args(cls, args) -> Client:
        """A client from adapterctl's connection flags (--addr, --timeout, --tls, --ca,
        --cert, --key, --token; the token defaults to $ADAPTERD_TOKEN)."""
        credentials = channel_credentials(
            tls=getattr(args, "tls", False), ca=getattr(args, "ca", None),
            cert=getattr(args, "cert", None), key=getattr(args, "key", None),
        )
        token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV)
        return cls(args.addr or default_addr(), credentials=credentials, metadata=auth_metadata(token),
                   timeout=args.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call_kwargs(self) -> dict:
        return {"metadata": self.metadata, "timeout": self.timeout}

    def _generate_kwargs(self, adapter: str) -> dict:
        kwargs = self._call_kwargs()
        if adapter:
            kwargs["metadata"] = (*self.metadata, (ADAPTER_HEADER, adapter))
        return kwargs

    def generate(self, prompt: str = "", *, adapter: str = "", messages: Messages = (), **params) -> pb.GenerateResponse:
        """`params` are GenerationParams fields (max_new_tokens, temperature, top_p, ...).
        Give `prompt`, or `messages` ((role, content) pairs: a conversation the server
        renders with the base model's chat template)."""
        return self.inference.Generate(request(prompt, adapter, messages=messages, **params),
                                       **self._generate_kwargs(adapter))

    def generate_stream(
        self, prompt: str = "", *, adapter: str = "", messages: Messages = (), **params
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Iterate the messages as the server sends them; cancel() the iterator to stop early."""
        return self.inference.GenerateStream(request(prompt, adapter, messages=messages, **params),
                                             **self._generate_kwargs(adapter))

    def health(self, service: str = "") -> str:
        """The serving status name of `service` ("" = the whole server): SERVING, NOT_SERVING, ..."""
        check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=_HealthCheckRequest.SerializeToString,
            response_deserializer=_HealthCheckResponse.FromString,
        )
        response = check(_HealthCheckRequest(service=service), **self._call_kwargs())
        return _SERVING_STATUS.values_by_number[response.status].name


def channel_credentials(
    *, tls: bool = False, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext. --ca, --cert and --key each imply TLS; without
    --ca the system's root certificates verify the server."""
    if not (tls or ca or cert or key):
        return None
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together: give both or neither")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def request(prompt: str, adapter: str = "", *, messages: Messages = (), **params) -> pb.GenerateRequest:
    params = {k: v for k, v in params.items() if v is not None}
    return pb.GenerateRequest(adapter=adapter, prompt=prompt, params=pb.GenerationParams(**params),
                              messages=[pb.ChatMessage(role=role, content=content) for role, content in messages])


def _health_messages():
    """grpc.health.v1 HealthCheckRequest/Response, from a descriptor in a private pool (so
    it never clashes with grpc_health's own module when both are loaded)."""
    f = descriptor_pb2.FileDescriptorProto(name="adapterctl/health.proto", package="grpc.health.v1", syntax="proto3")
    req = f.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    resp = f.message_type.add(name="HealthCheckResponse")
    status = resp.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    resp.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                   type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    req_desc = pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
    resp_desc = pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    return (
        message_factory.GetMessageClass(req_desc),
        message_factory.GetMessageClass(resp_desc),
        resp_desc.enum_types_by_name["ServingStatus"],
    )


_HealthCheckRequest, _HealthCheckResponse, _SERVING_STATUS = _health_messages()
