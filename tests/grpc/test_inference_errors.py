"""Every bad request gets its exact status code, and a message that names the field and
the limit. Over a real channel to a server on port 0."""

from __future__ import annotations

import threading

import grpc
import pytest
from adapterd.config import SchedulerConfig
from adapterd.registry.directory import DirectoryResolver
from adapterd.registry.store import Registry, blob_key, open_storage
from adapterd.resolve import ResolvedAdapter

from tests.grpc.conftest import registry_resolver
from tests.grpc_harness import long_request, request

INVALID = [
    # (request, words the message must contain)
    (request(""), ["prompt", "empty"]),
    (request("x" * 65), ["prompt", "65 tokens", "max input tokens (64)"]),
    (request("hello", max_new_tokens=252), ["params.max_new_tokens", "max total tokens (256)", "at most 251"]),
    (request("hello", max_new_tokens=0), ["params.max_new_tokens", ">= 1"]),
    (request("hello", temperature=-0.5), ["params.temperature", ">= 0"]),
    (request("hello", top_p=0.0), ["params.top_p", "(0, 1]"]),
    (request("hello", top_p=1.5), ["params.top_p", "(0, 1]"]),
    (request("hello", repetition_penalty=0.0), ["params.repetition_penalty", "> 0"]),
    (request("hello", presence_penalty=2.5), ["params.presence_penalty", "[-2, 2]"]),
    (request("hello", frequency_penalty=-3.0), ["params.frequency_penalty", "[-2, 2]"]),
    (request("hello", top_logprobs=3), ["params.top_logprobs", "params.logprobs"]),
    (request("hello", top_logprobs=21, logprobs=True), ["params.top_logprobs", "0..20"]),
    (request("hello", stop=["a", "b", "c", "d", "e"]), ["params.stop", "5 sequences", "at most 4"]),
    (request("hello", stop=["s" * 65]), ["params.stop[0]", "65 characters", "at most 64"]),
    (request("hello", stop=["ok", ""]), ["params.stop[1]", "empty"]),
    (request("hello", adapter="Not A Name"), ["adapter", "a-z"]),
]


def _code(call, req, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(req, **kw)
        if hasattr(result, "__next__"):  # a stream: the status comes while reading it
            list(result)
    return info.value.code(), info.value.details()


def test_invalid_arguments_name_the_field_and_limit(serve):
    server = serve()
    for req, words in INVALID:
        for call in (server.inference.Generate, server.inference.GenerateStream):
            code, details = _code(call, req)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (req, details)
            for word in words:
                assert word in details, (word, details)
    assert server.engine.stats()["queued"] == 0


def test_prompt_at_the_limits_is_accepted(serve):
    server = serve()
    out = server.inference.Generate(request("x" * 64, max_new_tokens=256 - 64))
    assert out.prompt_tokens == 64 and 1 <= out.completion_tokens <= 192


def test_unknown_adapter_is_not_found_never_the_base_model(serve):
    server = serve()
    for ref in ("missing", "missing@2", "a0@9", "other-tenant/a0"):
        code, details = _code(server.inference.Generate, request("hello", adapter=ref))
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert ref.split("@")[0].split("/")[-1] in details


def test_a_stored_adapter_that_fails_its_checksum_is_data_loss(serve, parts_for, registry_root, tmp_path):
    registry = Registry(open_storage(tmp_path), spec=parts_for(8).spec, max_rank=16)
    version = registry.push("default", "fragile", registry_root / "a0")
    blob = tmp_path / blob_key(version.files["adapter_model.safetensors"].sha256)
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    server = serve(resolver=registry_resolver(tmp_path, parts_for(8).spec))
    code, details = _code(server.inference.Generate, request("hello", adapter="fragile"))
    assert code == grpc.StatusCode.DATA_LOSS and "fragile@1" in details and "corrupt" in details


def test_adapter_files_that_fail_their_checks_at_load(serve, registry_root):
    # Without a registry (a directory of PEFT adapters), the checks run at first use.
    server = serve(resolver=DirectoryResolver(registry_root))
    code, details = _code(server.inference.Generate, request("hello", adapter="corrupt"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'corrupt' could not be loaded" in details
    code, details = _code(server.inference.Generate, request("hello", adapter="pickled"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter_model.bin" in details
    assert server.inference.Generate(request("hello", adapter="a0")).adapter == "a0"


class _Exploding:
    """The registry's adapters, plus "boom", whose load raises a plain exception."""

    def __init__(self, resolver, loads: list):
        self.resolver = resolver
        self.loads = loads

    def resolve(self, tenant, ref):
        if ref != "boom":
            return self.resolver.resolve(tenant, ref)

        def load(spec, max_rank):
            self.loads.append(1)
            raise RuntimeError("disk on fire")

        return ResolvedAdapter(key="boom-v1", name="boom", load=load)


def test_failed_load_fails_its_requests_once_and_nobody_else(serve, parts_for, registry_store):
    loads: list = []
    server = serve(resolver=_Exploding(registry_resolver(registry_store, parts_for(8).spec), loads))
    good = [server.inference.Generate.future(request("hello", adapter="a0")) for _ in range(3)]
    bad = [server.inference.Generate.future(request("hello", adapter="boom")) for _ in range(5)]
    for f in bad:
        assert f.exception().code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "adapter 'boom' could not be loaded: RuntimeError: disk on fire" in f.exception().details()
    assert len({f.result().text for f in good}) == 1
    assert len(loads) == 1
    # Within the retry interval a new request fails at once, without another load.
    code, _ = _code(server.inference.Generate, request("hi", adapter="boom"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and len(loads) == 1
    assert server.engine.stats()["running"] == 0


def test_an_exception_in_prefill_fails_only_that_request(serve, monkeypatch):
    server = serve()
    gen = server.engine._gen
    add = gen.add
    poison = server.engine.tokenizer("poison")["input_ids"]

    def add_or_fail(requests):
        if any(r.prompt_ids == poison for r in requests):
            raise RuntimeError("bad row")
        return add(requests)

    monkeypatch.setattr(gen, "add", add_or_fail)
    alone = server.inference.Generate(request("fine", adapter="a1")).text
    # Queue them together so they share one prefill group.
    futures = [server.inference.Generate.future(request(p, adapter="a1")) for p in ("fine", "poison", "fine")]
    assert futures[1].exception().code() == grpc.StatusCode.INTERNAL
    assert "request id" in futures[1].exception().details()
    assert futures[0].result().text == alone == futures[2].result().text
    assert server.inference.Generate(request("fine", adapter="a1")).text == alone


def test_queue_full_is_resource_exhausted_at_once(serve):
    server = serve(scheduler=SchedulerConfig(max_batch_size=1, max_queue=1, max_input_tokens=64, max_total_tokens=256))
    running = server.inference.GenerateStream(long_request())
    next(running)  # admitted: it holds the only row
    queued = server.inference.Generate.future(request("queued", max_new_tokens=2))
    server.wait_for(lambda s: s["queued"] == 1, what="one queued request")
    code, details = _code(server.inference.Generate, request("one too many"), timeout=5)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details
    running.cancel()
    assert queued.result(timeout=30).completion_tokens == 2


def test_deadline_expired_frees_the_row(serve):
    server = serve()
    code, _ = _code(server.inference.Generate, long_request(), timeout=0.05)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_for(lambda s: s["running"] == 0 and s["queued"] == 0, what="the row to be freed")


def test_draining_refuses_new_calls_with_unavailable(serve):
    server = serve()
    server.engine.drain()
    code, details = _code(server.inference.Generate, request("hello"))
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details


def test_not_serving_and_unavailable_until_the_model_is_warm(tiny_base, parts_for, registry_root):
    from adapterd.config import CacheConfig

    from tests.grpc_harness import TEST_SCHEDULER, RunningServer

    gate = threading.Event()
    parts = parts_for(8)

    def build():
        gate.wait(30)
        return parts

    server = RunningServer.start(
        build, DirectoryResolver(registry_root), scheduler=TEST_SCHEDULER,
        cache=CacheConfig(gpu_slots=8, max_rank=16), wait_ready=False,
    )
    try:
        from adapterctl.client import Client

        client = Client(server.addr)
        assert client.health() == "NOT_SERVING"
        assert client.health("adapterd.v1.Inference") == "NOT_SERVING"
        code, details = _code(server.inference.Generate, request("hello"))
        assert code == grpc.StatusCode.UNAVAILABLE and "not loaded yet" in details
        gate.set()
        server.engine.wait_ready(30)
        for _ in range(100):
            if client.health() == "SERVING":
                break
            threading.Event().wait(0.02)
        assert client.health() == "SERVING"
        assert client.health("adapterd.v1.Inference") == "SERVING"
        client.close()
    finally:
        gate.set()
        server.stop()


def test_if_the_engine_loop_dies_calls_get_unavailable_not_a_hang(serve, monkeypatch):
    server = serve()
    engine = server.engine

    def broken(sub):
        raise SystemExit("simulated fatal error outside an iteration")

    # Fatal errors (not Exception) escape the per-iteration guard: the loop must not leave
    # callers waiting forever.
    monkeypatch.setattr(engine._sched, "add", broken)
    code, details = _code(server.inference.Generate, request("hello"), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE
    code, _ = _code(server.inference.Generate, request("hello again"), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_warm_up_batch_stays_within_the_token_limits(serve, monkeypatch):
    """Before SERVING the engine runs a full batch; it must obey --max-batch-size,
    --max-input-tokens and --max-total-tokens like any request (a model with learned
    positions has no room past them)."""
    import adapterd.engine.loop as loop_module

    seen: list[tuple[int, int]] = []

    class Recording(loop_module.PagedGenerator):  # the engine the demo model gets
        def add(self, requests):
            seen.extend((len(r.prompt_ids), r.params.max_new_tokens) for r in requests)
            return super().add(requests)

    monkeypatch.setattr(loop_module, "PagedGenerator", Recording)
    server = serve(scheduler=SchedulerConfig(max_batch_size=3, max_input_tokens=6, max_total_tokens=8))
    warm = list(seen)
    assert len(warm) == 3, "one full batch"
    assert all(prompt == 6 and prompt + new <= 8 for prompt, new in warm), warm
    reply = server.inference.Generate(request("hey", max_new_tokens=2))
    assert reply.completion_tokens == 2


def test_top_logprobs_come_with_each_token_most_likely_first(serve):
    server = serve()
    req = request("alternatives", max_new_tokens=5, logprobs=True, top_logprobs=3, ignore_eos=True)
    whole = server.inference.Generate(req)
    streamed = [m for m in server.inference.GenerateStream(req)]
    assert len(whole.top_logprobs) == len(whole.token_ids) == 5
    for token, lp, top in zip(whole.token_ids, whole.logprobs, whole.top_logprobs, strict=True):
        assert len(top.token_ids) == 3 and list(top.logprobs) == sorted(top.logprobs, reverse=True)
        assert top.token_ids[0] == token and top.logprobs[0] == pytest.approx(lp)  # greedy: the first
    assert [t for m in streamed for t in m.top_logprobs] == list(whole.top_logprobs)
