"""Tenants on one server: tenant B against tenant A's private and public adapters and jobs,
tokens and roles, and per-tenant limits under a flood.

One server for the module, with an auth file of three tenants:
  a      owner of the adapters and the job under test; a user and a reader token
  b      the other tenant
  flood  at most 2 requests in flight, to flood with
A tenant that may not see something gets NOT_FOUND worded exactly as for something absent.
The job manager is never started: jobs stay queued, which is all tenancy needs (no worker
process is spawned).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from adapterctl.adapters import AdaptersClient, adapter_files, push_requests
from adapterctl.client import Client, auth_metadata
from adapterctl.train import TrainingClient
from adapterd.auth import hash_token
from adapterd.config import AuthConfig, CacheConfig, TrainingConfig
from adapterd.registry.storage import LocalStorage
from adapterd.registry.store import Registry, RegistryResolver
from adapterd.training import registry_publisher
from adapterd.training.jobs import JobManager
from adapterd_api.v1 import adapters_pb2 as apb
from adapterd_api.v1 import inference_pb2_grpc as pb_grpc
from adapterd_api.v1 import training_pb2 as tpb

from tests.grpc_harness import RunningServer, request

MAX_RANK = 16
TOKENS = {"a": "tok-a", "a-reader": "tok-a-reader", "b": "tok-b", "flood": "tok-flood"}
AUTH = f"""
[defaults]
tokens_per_minute = 0

[tenants.a]
max_training_jobs = 1
[[tenants.a.tokens]]
hash = "{hash_token(TOKENS['a'])}"
role = "user"
[[tenants.a.tokens]]
name = "dashboard"
hash = "{hash_token(TOKENS['a-reader'])}"
role = "reader"

[tenants.b]
[[tenants.b.tokens]]
hash = "{hash_token(TOKENS['b'])}"
role = "admin"

[tenants.flood]
max_concurrent_requests = 2
tokens_per_minute = 100000
[[tenants.flood.tokens]]
hash = "{hash_token(TOKENS['flood'])}"
role = "user"
"""


@pytest.fixture(scope="module")
def server(parts_for, tiny_base, adapter_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenancy")
    (root / "auth.toml").write_text(AUTH)
    registry = Registry(LocalStorage(root / "registry"), max_rank=MAX_RANK, max_bytes=10 << 20, deleted_grace_s=0)
    parts = parts_for(4)
    jobs = JobManager(TrainingConfig(jobs_dir=root / "jobs"), base_model=tiny_base, max_rank=MAX_RANK,
                      publish=registry_publisher(registry), tokenizer=parts.tokenizer,
                      module_names=parts.spec.linear_shapes)
    s = RunningServer.start(parts, RegistryResolver(registry), registry=registry, jobs=jobs,
                            cache=CacheConfig(gpu_slots=4, max_rank=MAX_RANK), auth=AuthConfig(root / "auth.toml"))
    s.dataset = root / "train.jsonl"
    s.dataset.write_text("".join(
        json.dumps({"prompt": f"Q: {i} plus {i}?\nA: ", "completion": str(2 * i)}) + "\n" for i in range(12)))
    s.adapter_dirs = [adapter_factory(tiny_base, "llama", seed=700 + i, rank=4, alpha=8) for i in range(2)]
    # Tenant a: one private adapter, one public one.
    ctl = adapters_as(s, "a")
    ctl.push(s.adapter_dirs[0], "priv")
    ctl.push(s.adapter_dirs[1], "pub", public=True)
    yield s
    s.stop()
    jobs.close()


def client(server: RunningServer, who: str | None) -> Client:
    return Client(server.addr, metadata=auth_metadata(TOKENS[who] if who else None), timeout=60)


def adapters_as(server: RunningServer, who: str | None) -> AdaptersClient:
    return AdaptersClient(client(server, who))


def training_as(server: RunningServer, who: str | None) -> TrainingClient:
    return TrainingClient(client(server, who))


def generate_as(server: RunningServer, who: str | None, adapter: str = "", max_new_tokens: int = 4):
    return pb_grpc.InferenceStub(server.channel).Generate(
        request("the tenants", adapter, max_new_tokens=max_new_tokens),
        metadata=auth_metadata(TOKENS[who] if who else None), timeout=60,
    )


def status(fn, *args, **kw) -> tuple[str, str]:
    """(code name, details) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code().name, info.value.details()


def as_if_absent(fn, ref: str, absent: str) -> None:
    """`fn(ref)` fails exactly as `fn(absent)` does, absent naming something that does not exist."""
    code, details = status(fn, ref)
    absent_code, absent_details = status(fn, absent)
    assert code == absent_code == "NOT_FOUND"
    assert details == absent_details.replace(absent, ref)


# ---- tokens and roles ---------------------------------------------------------------------


def test_missing_or_bad_token_is_unauthenticated(server):
    for who_metadata in (None, [("authorization", "Bearer nope")], [("authorization", "tok-a")]):
        stub = pb_grpc.InferenceStub(server.channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request("x", max_new_tokens=2), metadata=who_metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            server.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=who_metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in status(adapters_as(server, None).get, "priv")[1]
    # Health stays open: probes carry no token.
    assert client(server, None).health() == "SERVING"


def test_reader_may_use_but_not_change(server):
    reader = adapters_as(server, "a-reader")
    assert generate_as(server, "a-reader", "priv").completion_tokens >= 1
    assert {a.name for a in reader.list()} >= {"priv", "pub"}
    code, details = status(reader.push, server.adapter_dirs[0], "from-reader")
    assert code == "PERMISSION_DENIED" and "reader" in details
    assert status(reader.delete, "priv")[0] == "PERMISSION_DENIED"
    assert adapters_as(server, "a").get("priv").version == 1  # untouched


# ---- the matrix: b against a's adapters ----------------------------------------------------


def test_generate(server):
    assert generate_as(server, "a", "priv").completion_tokens >= 1
    as_if_absent(lambda ref: generate_as(server, "b", ref), "a/priv", "a/never-pushed")
    as_if_absent(lambda ref: generate_as(server, "b", ref), "a/priv@1", "a/never-pushed@1")
    assert status(generate_as, server, "b", "priv")[0] == "NOT_FOUND"  # b's own namespace has none
    # Public: b may use it by its full name, and gets what a gets.
    mine, theirs = generate_as(server, "a", "pub"), generate_as(server, "b", "a/pub")
    assert list(theirs.token_ids) == list(mine.token_ids)
    assert theirs.adapter == "a/pub@1"


def test_list(server):
    seen_by_b = {(a.tenant, a.name) for a in adapters_as(server, "b").list()}
    assert ("a", "pub") in seen_by_b and ("a", "priv") not in seen_by_b
    assert {a.name for a in adapters_as(server, "b").list(tenant="a")} == {"pub"}
    assert {a.name for a in adapters_as(server, "b").list(name="priv")} == set()
    assert {a.name for a in adapters_as(server, "a").list(tenant="a")} == {"priv", "pub"}


def test_get(server):
    b = adapters_as(server, "b")
    as_if_absent(b.get, "a/priv", "a/never-pushed")
    as_if_absent(b.get, "a/priv@1", "a/never-pushed@1")
    pub = b.get("a/pub")
    assert (pub.tenant, pub.name, pub.visibility) == ("a", "pub", apb.VISIBILITY_PUBLIC)


def test_delete(server):
    b = adapters_as(server, "b")
    as_if_absent(b.delete, "a/priv", "a/never-pushed")
    # A public adapter is shared read-only: b sees it, so it is told it may not delete it.
    assert status(b.delete, "a/pub")[0] == "PERMISSION_DENIED"
    assert status(b.delete, "priv")[0] == "NOT_FOUND"
    a = adapters_as(server, "a")
    assert a.get("priv").version == 1 and a.get("pub").version == 1


def test_push_cannot_overwrite(server):
    a, b = adapters_as(server, "a"), adapters_as(server, "b")
    before = a.get("priv")
    tokens_before = list(generate_as(server, "a", "priv", max_new_tokens=8).token_ids)
    # b pushing the same name makes b's own adapter; a's is untouched.
    mine = b.push(server.adapter_dirs[1], "priv")
    assert (mine.tenant, mine.name, mine.version) == ("b", "priv", 1)
    after = a.get("priv")
    assert (after.version, after.sha256, after.tenant) == (before.version, before.sha256, "a")
    assert list(generate_as(server, "a", "priv", max_new_tokens=8).token_ids) == tokens_before
    # A name in another tenant's namespace is not a name b can push at all (sent raw: the
    # client library would refuse it before sending).
    raw = push_requests(adapter_files(server.adapter_dirs[1]), "a/priv")
    assert status(b.stub.PushAdapter, raw, metadata=b.client.metadata)[0] == "INVALID_ARGUMENT"
    b.delete("priv")


def test_train(server):
    a, b, reader = training_as(server, "a"), training_as(server, "b"), training_as(server, "a-reader")
    job = a.create(server.dataset, name="tuned")
    assert job.state == tpb.QUEUED
    absent = "ftjob-" + "0" * 24
    as_if_absent(b.get, job.id, absent)
    as_if_absent(b.cancel, job.id, absent)
    as_if_absent(lambda job_id: next(iter(b.watch(job_id))), job.id, absent)
    assert job.id not in {j.id for j in b.list()}
    assert job.id in {j.id for j in a.list()}
    # The reader of a's tenant sees a's job but may neither start nor stop one.
    assert reader.get(job.id).id == job.id
    assert status(reader.create, server.dataset, name="tuned")[0] == "PERMISSION_DENIED"
    assert status(reader.cancel, job.id)[0] == "PERMISSION_DENIED"
    # a has max_training_jobs = 1: a second job while the first is queued is refused...
    code, details = status(a.create, server.dataset, name="tuned-too")
    assert code == "RESOURCE_EXHAUSTED" and "max_training_jobs" in details
    b_job = b.create(server.dataset, name="tuned")  # ...while b is not limited by a's jobs
    # ...and allowed once the first is cancelled.
    assert a.cancel(job.id).state == tpb.CANCELLED
    again = a.create(server.dataset, name="tuned-too")
    assert a.cancel(again.id).state == tpb.CANCELLED
    assert b.cancel(b_job.id).state == tpb.CANCELLED
    assert a.get(job.id).state == tpb.CANCELLED


# ---- limits ---------------------------------------------------------------------------------


def long_prompt(server: RunningServer, who: str, max_new_tokens: int) -> str:
    """A prompt the tiny random model does not end early with EOS (greedy is deterministic),
    so that each request stays in flight for max_new_tokens decode steps."""
    stub = pb_grpc.InferenceStub(server.channel)
    for i in range(20):
        prompt = f"flood {i}"
        reply = stub.Generate(request(prompt, max_new_tokens=max_new_tokens),
                              metadata=auth_metadata(TOKENS[who]), timeout=60)
        if reply.completion_tokens == max_new_tokens:
            return prompt
    pytest.fail("no prompt keeps the tiny model generating; the flood would not overlap")


def test_a_flooding_tenant_is_refused_while_others_are_served(server):
    prompt = long_prompt(server, "flood", 200)
    stub = pb_grpc.InferenceStub(server.channel)

    def flood_one(_):
        try:
            stub.Generate(request(prompt, max_new_tokens=200), metadata=auth_metadata(TOKENS["flood"]), timeout=60)
            return "OK", ""
        except grpc.RpcError as e:
            return e.code().name, e.details()

    with ThreadPoolExecutor(24) as pool:
        flood = [pool.submit(flood_one, i) for i in range(16)]
        others = [pool.submit(generate_as, server, "b", "", 16) for _ in range(4)]
        others += [pool.submit(generate_as, server, "a", "priv", 16) for _ in range(4)]
        outcomes = [f.result() for f in flood]
        served = [f.result() for f in others]  # raises if any of them failed
    refused = [d for code, d in outcomes if code == "RESOURCE_EXHAUSTED"]
    assert refused, "16 concurrent requests against a limit of 2 were all admitted"
    assert all("max_concurrent_requests" in d for d in refused)
    assert {code for code, _ in outcomes} <= {"OK", "RESOURCE_EXHAUSTED"}
    assert 1 <= sum(code == "OK" for code, _ in outcomes) < 16
    assert all(r.completion_tokens >= 1 for r in served)  # completed (EOS may come before 16)
    # The limit frees as requests end: the flooding tenant is served again afterwards.
    assert generate_as(server, "flood").completion_tokens >= 1
