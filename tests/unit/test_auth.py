"""Auth file parsing, token checks, roles, and the per-tenant limiter."""

from __future__ import annotations

import io
import json

import pytest
from adapterd import auth
from adapterd.auth import (
    Authenticator,
    AuthFileError,
    Quotas,
    TenantLimiter,
    check_role,
    hash_token,
    load_auth_file,
    parse_auth,
)
from adapterd.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from adapterd.tenancy import Principal

TOML = f"""
[defaults]
max_concurrent_requests = 8
tokens_per_minute = 1000

[tenants.acme]
max_concurrent_requests = 2

[[tenants.acme.tokens]]
name = "ci"
hash = "{hash_token('acme-secret')}"
role = "user"

[[tenants.acme.tokens]]
name = "dashboard"
hash = "{hash_token('acme-reader')}"
role = "reader"

[tenants.globex]
[[tenants.globex.tokens]]
hash = "{hash_token('globex-secret')}"
role = "admin"
"""


@pytest.fixture
def auth_file(tmp_path):
    p = tmp_path / "auth.toml"
    p.write_text(TOML)
    return load_auth_file(p)


def test_toml_file(auth_file):
    assert auth_file.tenants == {"acme", "globex"}
    assert auth_file.quotas["acme"] == Quotas(max_concurrent_requests=2, tokens_per_minute=1000)
    assert auth_file.quotas["globex"] == Quotas(max_concurrent_requests=8, tokens_per_minute=1000)
    assert {(t.tenant, t.name, t.role) for t in auth_file.tokens} == {
        ("acme", "ci", "user"), ("acme", "dashboard", "reader"), ("globex", "token-1", "admin")}
    # Only the hash is kept.
    assert all(b"secret" not in t.digest for t in auth_file.tokens)


def test_json_file(tmp_path):
    p = tmp_path / "auth.json"
    p.write_text(json.dumps({"tenants": {"a": {"max_training_jobs": 1, "tokens": [
        {"hash": hash_token("x"), "role": "reader"}]}}}))
    f = load_auth_file(p)
    assert f.quotas["a"].max_training_jobs == 1
    assert Authenticator(f).authenticate("Bearer x") == Principal("a", "reader")


@pytest.mark.parametrize(
    "data, needle",
    [
        ({}, "no tenants"),
        ({"tenants": {"Bad Name": {"tokens": [{"hash": hash_token("x")}]}}}, "tenant name"),
        ({"tenants": {"a": {}}}, "no tokens"),
        ({"tenants": {"a": {"tokens": [{"hash": "plaintext"}]}}}, "hash-token"),
        ({"tenants": {"a": {"tokens": [{"hash": hash_token("x"), "role": "root"}]}}}, "role 'root'"),
        ({"tenants": {"a": {"max_concurent_requests": 1, "tokens": [{"hash": hash_token("x")}]}}},
         "max_concurent_requests"),
        ({"tenants": {"a": {"tokens_per_minute": -1, "tokens": [{"hash": hash_token("x")}]}}},
         "tokens_per_minute"),
        ({"tenants": {"a": {"tokens": [{"hash": hash_token("x")}]},
                      "b": {"tokens": [{"hash": hash_token("x")}]}}}, "already given"),
        ({"tenants": {"a": {"tokens": [{"hash": hash_token("x"), "token": "x"}]}}}, "unknown keys"),
    ],
)
def test_bad_files_name_the_problem(data, needle):
    with pytest.raises(AuthFileError, match=needle):
        parse_auth(data, source="auth.toml")


def test_unreadable_and_malformed_files_name_the_flag(tmp_path):
    with pytest.raises(AuthFileError, match="--auth-file"):
        load_auth_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants\n")
    with pytest.raises(AuthFileError, match="not valid TOML"):
        load_auth_file(bad)


def test_authenticate(auth_file):
    a = Authenticator(auth_file)
    assert a.authenticate("Bearer acme-secret") == Principal("acme", "user")
    assert a.authenticate("bearer   acme-reader ") == Principal("acme", "reader")
    assert a.authenticate("Bearer globex-secret") == Principal("globex", "admin")
    for bad in (None, "", "acme-secret", "Basic acme-secret", "Bearer ", "Bearer acme-secre",
                "Bearer " + hash_token("acme-secret")):
        with pytest.raises(Unauthenticated):
            a.authenticate(bad)


def test_compare_digest_is_used_for_every_entry(auth_file, monkeypatch):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    Authenticator(auth_file).authenticate("Bearer acme-secret")  # the first entry matches
    assert len(calls) == len(auth_file.tokens)  # and the others are still compared


def test_roles():
    reader, user, admin = (Principal("a", r) for r in ("reader", "user", "admin"))
    for m in ("/adapterd.v1.Inference/Generate", "/adapterd.v1.Inference/GenerateStream",
              "/adapterd.v1.Adapters/ListAdapters", "/adapterd.v1.Adapters/GetAdapter",
              "/adapterd.v1.Training/GetJob", "/adapterd.v1.Training/WatchJob"):
        check_role(reader, m)
    for m in ("/adapterd.v1.Adapters/PushAdapter", "/adapterd.v1.Adapters/DeleteAdapter",
              "/adapterd.v1.Training/CreateJob", "/adapterd.v1.Training/CancelJob",
              "/adapterd.v1.Adapters/SomethingAddedLater"):
        check_role(user, m)
        check_role(admin, m)
        with pytest.raises(PermissionDenied, match="reader"):
            check_role(reader, m)
    assert auth.is_open_method("/grpc.health.v1.Health/Check")
    assert not auth.is_open_method("/adapterd.v1.Adapters/ListAdapters")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_concurrent_limit_names_itself_and_frees_on_close():
    rejected = []
    lim = TenantLimiter({"a": Quotas(max_concurrent_requests=2)},
                        on_reject=lambda t, limit: rejected.append((t, limit)))
    l1, l2 = lim.admit("a"), lim.admit("a")
    with pytest.raises(ResourceExhausted, match="max_concurrent_requests"):
        lim.admit("a")
    assert rejected == [("a", "max_concurrent_requests")]
    lim.admit("b").close()  # another tenant (default quotas: unlimited) is not affected
    l1.close()
    l1.close()  # idempotent
    lim.admit("a")
    l2.close()
    assert lim.in_flight("a") == 1


def test_queued_limit_counts_only_requests_not_yet_running():
    lim = TenantLimiter({"a": Quotas(max_queued_requests=1, max_concurrent_requests=3)})
    first = lim.admit("a")
    with pytest.raises(ResourceExhausted, match="max_queued_requests"):
        lim.admit("a")
    first.running()
    second = lim.admit("a")
    assert lim.queued("a") == 1 and lim.in_flight("a") == 2
    second.close()
    first.close()
    assert lim.queued("a") == 0 and lim.in_flight("a") == 0


def test_tokens_per_minute_is_a_sliding_window():
    clock = Clock()
    lim = TenantLimiter({"a": Quotas(tokens_per_minute=100)}, clock=clock)
    lim.admit("a").close(tokens=60)
    clock.t += 30
    lim.admit("a").close(tokens=40)
    with pytest.raises(ResourceExhausted, match="tokens_per_minute"):
        lim.admit("a")
    clock.t += 31  # the first 60 tokens fall out of the window
    lim.admit("a").close()


def test_training_jobs_limit():
    lim = TenantLimiter({"a": Quotas(max_training_jobs=1)})
    lim.check_training_jobs("a", 0)
    with pytest.raises(ResourceExhausted, match="max_training_jobs"):
        lim.check_training_jobs("a", 1)
    lim.check_training_jobs("b", 100)


def test_single_tenant_limiter_refuses_nothing():
    lim = TenantLimiter.from_auth(None)
    leases = [lim.admit("default") for _ in range(1000)]
    lim.check_training_jobs("default", 1000)
    for lease in leases:
        lease.close(tokens=10**6)
    lim.admit("default")


def test_hash_token_cli(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert auth.hash_token_command() == 0
    assert capsys.readouterr().out.strip() == hash_token("s3cret")
    assert auth.hash_token_command(new=True) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].removeprefix("token: ")
    assert token.startswith("adt_") and len(token) > 40
    assert out[1] == f'hash = "{hash_token(token)}"'
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert auth.hash_token_command() == 2


def test_without_auth_file_only_loopback_unless_insecure_open(tmp_path):
    from adapterd.config import AuthConfig, Config, ConfigError, ServerConfig, TlsConfig

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        Config(server=ServerConfig(host=host))
    for host in ("0.0.0.0", "::", "10.0.0.5", "adapterd.example.com"):
        with pytest.raises(ConfigError, match="--auth-file.*--insecure-open"):
            Config(server=ServerConfig(host=host))
        Config(server=ServerConfig(host=host), auth=AuthConfig(insecure_open=True))
    auth = tmp_path / "auth.toml"
    auth.write_text(TOML)
    cfg = Config(server=ServerConfig(host="0.0.0.0"), auth=AuthConfig(auth))
    assert cfg.auth.tenants.tenants == {"acme", "globex"}
    # A bad auth file stops start-up with the file's problem, as a flag error.
    auth.write_text("[tenants.acme]\n")
    with pytest.raises(ConfigError, match="no tokens"):
        AuthConfig(auth)
    # TLS flags come in pairs.
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key"):
        TlsConfig(cert=auth)
    with pytest.raises(ConfigError, match="--tls-client-ca needs"):
        TlsConfig(client_ca=auth)


def test_serve_flags(tmp_path):
    import argparse

    from adapterd.config import Config, add_serve_flags

    auth = tmp_path / "auth.toml"
    auth.write_text(TOML)
    p = argparse.ArgumentParser()
    add_serve_flags(p)
    cfg = Config.from_args(p.parse_args(
        ["--host", "0.0.0.0", "--auth-file", str(auth), "--metrics-port", "9500", "--metrics-top-adapters", "5"]))
    assert (cfg.metrics.port, cfg.metrics.top_adapters, cfg.auth.auth_file) == (9500, 5, auth)
    assert Config.from_args(p.parse_args([])).metrics.port == 9400
