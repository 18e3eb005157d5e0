"""Tenants over HTTP: the same auth file, tokens, roles and limits as gRPC, seen through the
official openai client (401, 403, 429 with Retry-After; what /v1/models shows each tenant)."""

from __future__ import annotations

import http.client
import json

import openai
import pytest
from adapterd.auth import hash_token
from adapterd.config import AuthConfig, CacheConfig, Config, ConfigError, HttpConfig, ServerConfig
from adapterd.metrics import Metrics
from adapterd.registry.storage import LocalStorage
from adapterd.registry.store import Registry, RegistryResolver
from prometheus_client import CollectorRegistry

from tests.http.conftest import MAX_RANK
from tests.http_harness import OpenAIServer

TOKENS = {"a": "tok-a", "a-reader": "tok-a-reader", "b": "tok-b"}
AUTH = f"""
[tenants.a]
max_concurrent_requests = 1
[[tenants.a.tokens]]
hash = "{hash_token(TOKENS['a'])}"
role = "user"
[[tenants.a.tokens]]
hash = "{hash_token(TOKENS['a-reader'])}"
role = "reader"

[tenants.b]
[[tenants.b.tokens]]
hash = "{hash_token(TOKENS['b'])}"
role = "admin"
"""


@pytest.fixture(scope="module")
def server(parts_for, registry_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-auth")
    (root / "auth.toml").write_text(AUTH)
    parts = parts_for(4)
    registry = Registry(LocalStorage(root / "registry"), spec=parts.spec, max_rank=MAX_RANK, deleted_grace_s=0)
    registry.push("a", "mine", registry_root / "a0")
    registry.push("a", "gone", registry_root / "a1")
    s = OpenAIServer.start(parts, RegistryResolver(registry), registry=registry, metrics=Metrics(CollectorRegistry()),
                           cache=CacheConfig(gpu_slots=4, max_rank=MAX_RANK), auth=AuthConfig(root / "auth.toml"),
                           http=HttpConfig(port=0))
    yield s
    s.stop()


def test_no_or_a_wrong_token_is_401(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    assert r.status == 401 and json.loads(r.read())["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        server.openai("not-a-token").models.list()


def test_each_tenant_sees_its_own_adapters(server):
    mine = {m.id for m in server.openai(TOKENS["a"]).models.list().data}
    theirs = {m.id for m in server.openai(TOKENS["b"]).models.list().data}
    assert {"mine", "gone"} <= mine and not {"mine", "gone", "a/mine"} & theirs
    with pytest.raises(openai.NotFoundError) as e:
        server.openai(TOKENS["b"]).completions.create(model="a/mine", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"
    out = server.openai(TOKENS["a"]).completions.create(model="mine", prompt="x", max_tokens=2)
    assert out.model == "mine@1"


def test_a_reader_token_cannot_delete_a_user_token_can(server):
    with pytest.raises(openai.PermissionDeniedError) as e:
        server.openai(TOKENS["a-reader"]).models.delete("gone")
    assert "reader" in e.value.body["message"]
    assert server.openai(TOKENS["a"]).models.delete("gone").deleted
    with pytest.raises(openai.NotFoundError):
        server.openai(TOKENS["a"]).models.retrieve("gone")


def test_over_the_tenant_limit_is_429_with_retry_after(server):
    client = server.openai(TOKENS["a"])
    stream = client.completions.create(model="", prompt="long", max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the tenant's one request in flight
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="", prompt="x", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    assert "max_concurrent_requests" in e.value.body["message"]
    stream.close()
    server.wait_for(lambda s: s["running"] == 0, what="the stream's row to be freed")


def test_the_http_host_follows_the_same_rule_as_grpc():
    with pytest.raises(ConfigError, match="--http-host 0.0.0.0"):
        Config(server=ServerConfig(host="127.0.0.1"), http=HttpConfig(port=8000, host="0.0.0.0"))
    Config(server=ServerConfig(host="127.0.0.1"), http=HttpConfig(port=8000))  # loopback: fine
    Config(http=HttpConfig(port=-1, host="0.0.0.0"))  # off: nothing listens
