"""The OpenAI-compatible HTTP API through the official `openai` client, on a real server
(the tiny random Llama, adapters a0..a7 in a registry), one server for the module.

What a user sees: chat and completions, streamed and whole, with usage; /v1/models with
versions and lineage; `model` naming an adapter gives exactly the tokens gRPC gives;
seeded n; logprobs; stop; the raw SSE framing; errors in OpenAI's shape.
"""

from __future__ import annotations

import http.client
import json

import openai
import pytest
from adapterd.config import CacheConfig, HttpConfig
from adapterd.metrics import Metrics
from prometheus_client import CollectorRegistry

from tests.grpc_harness import request
from tests.http.conftest import MAX_RANK, registry_resolver
from tests.http_harness import OpenAIServer

FULL = {"ignore_eos": True}


def post(server, path: str, body: bytes | dict) -> http.client.HTTPResponse:
    """A raw POST (what curl sends); read the response from what this returns."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", f"/v1{path}", body=data, headers={"Content-Type": "application/json"})
    return conn.getresponse()  # the random model may end early; these run to max_tokens


@pytest.fixture(scope="module")
def server(parts_for, registry_store):
    parts = parts_for(4)
    resolver = registry_resolver(registry_store, parts.spec)
    s = OpenAIServer.start(parts, resolver, registry=resolver.registry, metrics=Metrics(CollectorRegistry()),
                           cache=CacheConfig(gpu_slots=4, max_rank=MAX_RANK), http=HttpConfig(port=0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = server.openai()
    yield c
    c.close()


def test_chat_whole_and_streamed_agree(client, server):
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="", messages=messages, max_tokens=10, temperature=0,
                                           extra_body=FULL)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 10

    chunks = list(client.chat.completions.create(model="", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=FULL))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_whole_and_streamed_agree(client):
    whole = client.completions.create(model="", prompt="once upon", max_tokens=8, temperature=0, extra_body=FULL)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 8
    streamed = list(client.completions.create(model="", prompt="once upon", max_tokens=8, temperature=0,
                                              stream=True, extra_body=FULL))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_models_list_shows_the_base_and_every_adapter_with_lineage(client, server):
    models = {m.id: m for m in client.models.list().data}
    base = server.engine.cache.spec.name
    assert base in models and models[base].parent is None
    for name in (f"a{i}" for i in range(8)):
        card = models[name]
        assert card.parent == base and card.root == f"default/{name}@1" and card.version == 1
    assert client.models.retrieve("a3").root == "default/a3@1"
    # the base model's name works as `model`, and the response names what served it
    out = client.completions.create(model=base, prompt="x", max_tokens=2, temperature=0)
    assert out.model == base


def test_model_naming_an_adapter_gives_its_grpc_tokens(client, server):
    grpc_base = server.inference.Generate(request("the adapter says", "", max_new_tokens=12, ignore_eos=True))
    grpc_a1 = server.inference.Generate(request("the adapter says", "a1", max_new_tokens=12, ignore_eos=True))
    assert grpc_a1.text != grpc_base.text  # the adapter really changes the output
    for model in ("a1", "a1@1", "default/a1"):
        out = client.completions.create(model=model, prompt="the adapter says", max_tokens=12, temperature=0,
                                        extra_body=FULL)
        assert out.choices[0].text == grpc_a1.text and out.model == "a1@1"
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, extra_body=FULL)
    from adapterd_api.v1 import inference_pb2 as pb

    grpc_chat = server.inference.Generate(pb.GenerateRequest(
        adapter="a1", messages=[pb.ChatMessage(role="user", content="hi")],
        params=pb.GenerationParams(max_new_tokens=6, logprobs=True, ignore_eos=True)))
    assert chat.choices[0].message.content == grpc_chat.text
    got = [t.logprob for t in chat.choices[0].logprobs.content]
    assert got == pytest.approx(list(grpc_chat.logprobs), abs=1e-5)
    assert all(lp <= 0 for lp in got) and len(got) == 6


def test_a_weighted_mix_gives_its_grpc_tokens(client, server):
    from adapterd_api.v1 import inference_pb2 as pb

    mix = [("a1", 0.7), ("a2", 0.3)]
    grpc_mix = server.inference.Generate(pb.GenerateRequest(
        prompt="the mix says", combination="cat", params=pb.GenerationParams(max_new_tokens=12, ignore_eos=True),
        adapters=[pb.WeightedAdapter(adapter=a, weight=w) for a, w in mix]))
    grpc_a1 = server.inference.Generate(request("the mix says", "a1", max_new_tokens=12, ignore_eos=True))
    assert grpc_mix.text != grpc_a1.text and grpc_mix.adapter == "a1@1*0.7+a2@1*0.3"
    body = {**FULL, "adapters": [{"adapter": a, "weight": w} for a, w in mix], "combination": "cat"}
    out = client.completions.create(model="", prompt="the mix says", max_tokens=12, temperature=0, extra_body=body)
    assert out.choices[0].text == grpc_mix.text and out.model == "a1@1*0.7+a2@1*0.3"
    for bad, param in [({"adapters": [{"adapter": "a1", "weight": "x"}]}, "adapters"),
                       ({"combination": "cat"}, "combination")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="", prompt="x", max_tokens=2, extra_body=bad)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a1", prompt="x", max_tokens=2, extra_body={"adapters": [{"adapter": "a2"}]})
    assert "model must be the base model" in e.value.body["message"]


def test_n_choices_with_a_seed_are_reproducible_and_differ(client):
    def ask():
        out = client.completions.create(model="a2", prompt="pick", max_tokens=8, temperature=1.0, n=3, seed=7,
                                        extra_body=FULL)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)], out.usage

    first, usage = ask()
    again, _ = ask()
    assert first == again and len(set(first)) == 3
    assert usage.completion_tokens == 24


def test_logprobs_on_completions(client):
    out = client.completions.create(model="", prompt="log", max_tokens=5, temperature=0, logprobs=0, extra_body=FULL)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and len(lp.tokens) == 5 and all(x <= 0 for x in lp.token_logprobs)


def test_top_logprobs_on_chat_and_completions(client):
    """top_logprobs alternatives, most likely first; greedy picks the first of them; the
    legacy completions API takes logprobs=N for the same."""
    msgs = [{"role": "user", "content": "alternatives"}]
    out = client.chat.completions.create(model="a0", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body=FULL)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        alts = [a.logprob for a in entry.top_logprobs]
        assert len(alts) == 3 and alts == sorted(alts, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(alts[0])
    out = client.completions.create(model="a0", prompt="alternatives", max_tokens=3, temperature=0, logprobs=2,
                                    extra_body=FULL)
    lp = out.choices[0].logprobs
    assert len(lp.top_logprobs) == 3 and all(len(d) <= 2 for d in lp.top_logprobs)
    assert all(max(d.values()) == pytest.approx(chosen) for d, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))


def test_frequency_penalty_changes_what_repeats(client):
    """A strong frequency penalty steers greedy decoding off the tokens it already produced."""
    kw = dict(model="", prompt="the the the", max_tokens=24, temperature=0, extra_body=FULL)
    plain = client.completions.create(**kw)
    penalized = client.completions.create(frequency_penalty=2.0, **kw)
    assert plain.choices[0].text != penalized.choices[0].text


def test_stop_sequence_ends_the_text_before_it(client):
    free = client.completions.create(model="", prompt="stop here", max_tokens=16, temperature=0, extra_body=FULL)
    text = free.choices[0].text
    stop = text[5:7]
    assert stop and stop not in text[:5]
    out = client.completions.create(model="", prompt="stop here", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body=FULL)
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"


def test_raw_sse_framing(server):
    body = {"model": "", "messages": [{"role": "user", "content": "sse"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = post(server, "/chat/completions", body)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["usage"]["completion_tokens"] == 4 and payloads[-1]["choices"] == []


def test_errors_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    for kw, param in ((dict(logit_bias={"1": 5}), "logit_bias"), (dict(presence_penalty=2.5), "presence_penalty"),
                      (dict(max_tokens=100000), "max_tokens"), (dict(temperature=3), "temperature"),
                      (dict(top_logprobs=3), "top_logprobs"), (dict(top_logprobs=21, logprobs=True), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}], **kw)
        assert e.value.body["param"] == param, e.value.body
        assert param in e.value.body["message"]
    r = post(server, "/completions", b"{" + b" " * (5 * 2**20) + b"}")
    assert r.status == 413 and json.loads(r.read())["error"]["type"] == "rate_limit_error"
    r = post(server, "/completions", b"not json")
    assert r.status == 400 and "JSON" in json.loads(r.read())["error"]["message"]


def test_a_client_closing_a_stream_frees_its_row(server):
    body = {"model": "a0", "prompt": "keep going", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    r = post(server, "/completions", body)
    for _ in range(3):
        assert r.readline().startswith(b"data: ") and r.readline() == b"\n"
    server.wait_for(lambda s: s["running"] == 1, what="the row to run")
    r.close()  # the client goes away mid-stream
    server.wait_for(lambda s: s["running"] == 0, timeout=5, what="the row to be freed")


def test_draining_is_503(openai_server):
    server = openai_server()
    client = server.openai()
    server.engine.drain()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="", prompt="x", max_tokens=2)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
