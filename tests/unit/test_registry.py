"""The registry on both backends: a local directory and a real S3-compatible server.

Each test runs twice (local, s3) through the `registry` fixture. Every bad push gets its
exact error and leaves the registry as it was; stored files are verified on read; a
pushing process killed with -9 leaves the previous version intact and its leftovers are
cleaned at the next start.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import adapterd_rules as check
import pytest
import torch
from adapterd import errors
from adapterd.engine.model import model_spec
from adapterd.registry.storage import LocalStorage, S3Options, S3Storage
from adapterd.registry.store import AdapterVersion, Registry, blob_key
from adapterd.registry.validate import read_adapter

from tests.adapter_cases import BAD_PUSHES, bad_adapter

MAX_RANK = 16


@pytest.fixture(scope="module")
def llama(model_factory, adapter_factory):
    """(spec, [three different adapter dirs]) on the tiny Llama."""
    from transformers import AutoModelForCausalLM

    base = model_factory("llama")
    spec = model_spec(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), base)
    adapters = [adapter_factory(base, "llama", seed, rank=4, alpha=8) for seed in (1, 2, 3)]
    return spec, adapters


def _storage(kind: str, tmp_path: Path, request):
    if kind == "local":
        return LocalStorage(tmp_path / "registry")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, "team/adapters", S3Options(endpoint, "us-east-1", "test", "test"))


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    return request.param, _storage(request.param, tmp_path, request)


@pytest.fixture
def registry(backend, llama):
    spec, _ = llama
    return Registry(backend[1], spec=spec, max_rank=MAX_RANK, max_bytes=10 << 20, deleted_grace_s=0)


def _keys(storage) -> list[str]:
    return [o.key for o in storage.list("")]


# ---- versions -----------------------------------------------------------------------------


def test_push_makes_numbered_immutable_versions(registry, llama):
    spec, (a1, a2, _) = llama
    v1 = registry.push("default", "sql", a1, description="first")
    v2 = registry.push("default", "sql", a2, visibility="public")
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert registry.resolve("default", "sql") == v2
    assert registry.resolve("default", "sql@1") == v1
    assert registry.resolve("default", "default/sql@1") == v1
    assert v1.ref == "sql@1" and v1.full_ref == "default/sql@1"
    # metadata of the issue: name, tenant, version, sha256, size, rank, alpha, targets, base, ...
    assert v1.rank == 4 and v1.alpha == 8 and v1.scaling == 2.0
    assert v1.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert v1.base_identity == spec.identity and v1.size == sum(e.size for e in v1.files.values())
    assert v1.description == "first" and v1.visibility == "private" and v1.source == "pushed"
    assert v2.visibility == "public" and v1.created_at <= v2.created_at
    assert AdapterVersion.from_json(v1.to_json()) == v1


def test_a_push_reads_each_file_once_to_hash_it(registry, llama, monkeypatch):
    """The registry records the digests a push computed as the bytes arrived, and a push
    without them hashes each file once, not once to check and again to record."""
    import hashlib

    _, (a1, a2, _) = llama
    hashed = []
    real = check.sha256_file
    monkeypatch.setattr(check, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    v1 = registry.push("default", "sql", a1)
    assert hashed == [check.WEIGHTS_FILE]
    given = {n: hashlib.sha256((a2 / n).read_bytes()).hexdigest() for n in check.ADAPTER_FILES}
    hashed.clear()
    v2 = registry.push("default", "sql", {n: a2 / n for n in check.ADAPTER_FILES}, sha256=given)
    assert hashed == [] and {n: e.sha256 for n, e in v2.files.items()} == given
    assert v2.sha256 == check.adapter_digest(given) != v1.sha256
    assert registry.load(v2).sha256 == v2.sha256  # what was recorded is what the files hold


def test_load_is_verified_and_equals_the_directory(registry, llama):
    spec, (a1, _, _) = llama
    v = registry.push("default", "sql", a1)
    w = registry.load(v)
    ref = read_adapter(a1, spec, MAX_RANK)
    assert w.sha256 == v.sha256 == ref.sha256 and w.name == "sql@1"
    assert w.tensors.keys() == ref.tensors.keys()
    for k, (a, b) in ref.tensors.items():
        assert torch.equal(w.tensors[k][0], a) and torch.equal(w.tensors[k][1], b)


def test_same_files_share_blobs(registry, llama):
    _, (a1, _, _) = llama
    v1 = registry.push("default", "one", a1)
    v2 = registry.push("default", "two", a1)
    assert v1.sha256 == v2.sha256
    assert len([k for k in _keys(registry.storage) if k.startswith("blobs/")]) == 2


def test_training_push_keeps_job_and_metrics(registry, llama):
    _, (a1, _, _) = llama
    v = registry.push("acme", "tuned", a1, source="trained", job_id="job-7", metrics={"eval_loss": 1.5})
    got = registry.get("acme", "tuned@1")
    assert (got.source, got.job_id, got.metrics) == ("trained", "job-7", {"eval_loss": 1.5}) and got == v


def test_push_from_bytes_mapping(registry, llama):
    _, (a1, _, _) = llama
    files = {n: (a1 / n).read_bytes() for n in check.ADAPTER_FILES}
    v = registry.push("default", "mem", files)
    assert registry.read_files(v) == files


def test_concurrent_pushes_lose_no_version(registry, llama):
    _, adapters = llama
    results, errs = [], []

    def push(i):
        try:
            results.append(registry.push("default", "race", adapters[i % 3]).version)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errs.append(e)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs and sorted(results) == [1, 2, 3, 4, 5, 6]


def test_two_registries_on_one_store_see_each_other(backend, llama):
    spec, (a1, a2, _) = llama
    r1 = Registry(backend[1], spec=spec, max_rank=MAX_RANK)
    r2 = Registry(backend[1], spec=spec, max_rank=MAX_RANK)  # a second replica
    r1.push("default", "shared", a1)
    assert r2.resolve("default", "shared").version == 1
    r2.push("default", "shared", a2)
    assert r1.resolve("default", "shared@2").version == 2
    assert r1.push("default", "shared", a1).version == 3


# ---- integrity ----------------------------------------------------------------------------


def _flip_byte(storage, key: str, at: int = -3) -> None:
    data = bytearray(storage.read(key))
    data[at] ^= 0x01
    if isinstance(storage, LocalStorage):  # behind the registry's back, like bit rot
        (storage.root / key).write_bytes(bytes(data))
    else:
        storage.put(key, bytes(data))


def test_flipped_byte_is_data_loss_for_that_adapter_alone(registry, llama):
    _, (a1, a2, _) = llama
    bad = registry.push("default", "bad", a1)
    good = registry.push("default", "good", a2)
    _flip_byte(registry.storage, blob_key(bad.files[check.WEIGHTS_FILE].sha256))
    with pytest.raises(errors.ChecksumMismatch, match="default/bad@1: stored file adapter_model.safetensors is corrupt") as e:
        registry.load(bad)
    assert e.value.code == "DATA_LOSS"
    assert registry.load(good).sha256 == good.sha256
    assert registry.resolve("default", "bad").version == 1  # still listed; delete and push again


def test_missing_blob_is_data_loss(registry, llama):
    _, (a1, _, _) = llama
    v = registry.push("default", "gone", a1)
    registry.storage.delete(blob_key(v.files[check.CONFIG_FILE].sha256))
    with pytest.raises(errors.ChecksumMismatch, match="missing"):
        registry.load(v)


def test_adapter_pushed_for_another_base_is_not_loaded(backend, llama):
    spec, (a1, _, _) = llama
    Registry(backend[1], spec=spec, max_rank=MAX_RANK).push("default", "x", a1)
    other = dataclasses.replace(spec, identity="f" * 64)
    reg = Registry(backend[1], spec=other, max_rank=MAX_RANK)
    with pytest.raises(errors.AdapterMismatch, match="was pushed for base model"):
        reg.load(reg.resolve("default", "x"))


# ---- delete -------------------------------------------------------------------------------


@pytest.mark.slow
def test_delete_one_version_then_all(registry, llama):
    _, adapters = llama
    for a in adapters:
        registry.push("default", "sql", a)
    assert [v.version for v in registry.delete("default", "sql@3")] == [3]
    with pytest.raises(errors.NotFound):
        registry.resolve("default", "sql@3")
    assert registry.resolve("default", "sql").version == 2  # the latest live one
    with pytest.raises(errors.NotFound):
        registry.delete("default", "sql@3")
    assert sorted(v.version for v in registry.delete("default", "sql")) == [1, 2]
    with pytest.raises(errors.NotFound):
        registry.resolve("default", "sql")
    assert registry.list("default")[0] == []
    # numbers are never reused: a client pinned to sql@3 can never get other weights
    assert registry.push("default", "sql", adapters[0]).version == 4
    # blobs of deleted versions are gone, the live one's remain (on S3 a sweep spares blobs
    # younger than LastModified's resolution: they could belong to a push in flight)
    time.sleep(registry.storage.mtime_slack_s)
    registry.collect_garbage()
    live = registry.resolve("default", "sql")
    blobs = {k.rsplit("/", 1)[1] for k in _keys(registry.storage) if k.startswith("blobs/")}
    assert blobs == {e.sha256 for e in live.files.values()}


def test_a_version_resolved_before_its_delete_still_loads_within_the_grace(backend, llama):
    spec, (a1, _, _) = llama
    registry = Registry(backend[1], spec=spec, max_rank=MAX_RANK, deleted_grace_s=3600)
    v = registry.push("default", "sql", a1)
    resolved = registry.resolve("default", "sql")  # a request resolved it, its load is queued
    registry.delete("default", "sql")
    registry.collect_garbage()
    assert registry.load(resolved).sha256 == v.sha256  # the files stay for the grace period
    registry.deleted_grace_s = 0
    time.sleep(registry.storage.mtime_slack_s)
    registry.collect_garbage()
    with pytest.raises(errors.NotFound, match="was deleted"):
        registry.load(resolved)


def test_delete_keeps_blobs_shared_with_live_versions(registry, llama):
    _, (a1, _, _) = llama
    registry.push("default", "one", a1)
    two = registry.push("default", "two", a1)
    registry.delete("default", "one")
    assert registry.load(two).sha256 == two.sha256


# ---- tenants ------------------------------------------------------------------------------


def test_private_adapters_of_others_do_not_exist(registry, llama):
    _, (a1, a2, _) = llama
    registry.push("acme", "secret", a1)
    registry.push("acme", "shared", a2, visibility="public")
    with pytest.raises(errors.NotFound) as hidden:
        registry.resolve("beta", "acme/secret")
    with pytest.raises(errors.NotFound) as absent:
        registry.resolve("beta", "acme/nothing")
    assert str(hidden.value).replace("secret", "X") == str(absent.value).replace("nothing", "X")
    assert registry.resolve("beta", "acme/shared@1").tenant == "acme"
    with pytest.raises(errors.NotFound):
        registry.resolve("beta", "shared")  # no tenant: the caller's own namespace
    with pytest.raises(errors.PermissionDenied, match="only its owner"):
        registry.delete("beta", "acme/shared")
    with pytest.raises(errors.NotFound):
        registry.delete("beta", "acme/secret")
    assert [(v.tenant, v.name) for v in registry.list("beta")[0]] == [("acme", "shared")]
    assert [v.name for v in registry.list("acme")[0]] == ["secret", "shared"]


# ---- list ---------------------------------------------------------------------------------


def test_list_filters_and_pages(registry, llama):
    _, adapters = llama
    for name in ("a", "b", "c", "d", "e"):
        registry.push("default", name, adapters[0])
    registry.push("default", "c", adapters[1], visibility="public")
    names, token = [], ""
    while True:
        page, token = registry.list("default", page_size=2, page_token=token)
        assert len(page) <= 2
        names += [v.ref for v in page]
        if not token:
            break
    assert names == ["a@1", "b@1", "c@2", "d@1", "e@1"]
    everything = registry.list("default", all_versions=True, page_size=100)[0]
    assert [v.ref for v in everything] == ["a@1", "b@1", "c@2", "c@1", "d@1", "e@1"]
    pages, token = [], ""
    while True:
        page, token = registry.list("default", all_versions=True, page_size=1, page_token=token)
        pages += page
        if not token:
            break
    assert pages == everything
    assert [v.ref for v in registry.list("default", name="c", all_versions=True)[0]] == ["c@2", "c@1"]
    assert [v.ref for v in registry.list("default", visibility="public")[0]] == ["c@2"]
    assert registry.list("default", source="trained")[0] == []
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        registry.list("default", page_token="garbage!")
    with pytest.raises(errors.InvalidArgument, match="page_size"):
        registry.list("default", page_size=0)


# ---- bad pushes: exact errors, nothing written, registry still serving ----------------------


@pytest.mark.parametrize("case,cls,code,fragment", BAD_PUSHES, ids=[c[0] for c in BAD_PUSHES])
def test_bad_push_is_refused_and_changes_nothing(backend, llama, tmp_path, model_factory, adapter_factory,
                                                 case, cls, code, fragment):
    spec, (good, other, _) = llama
    falcon = adapter_factory(model_factory("falcon"), "falcon", 1, rank=4, alpha=8) if case == "other_base" else None
    max_rank = 2 if case == "rank" else MAX_RANK
    max_bytes = 1000 if case == "too_big" else 10 << 20
    registry = Registry(backend[1], spec=spec, max_rank=max_rank, max_bytes=max_bytes)
    serving = Registry(backend[1], spec=spec, max_rank=MAX_RANK)
    v1 = serving.push("default", "sql", other)
    before = _keys(backend[1])
    with pytest.raises(cls, match=fragment.replace("(", r"\(")) as e:
        registry.push("default", "sql", bad_adapter(case, good, tmp_path, falcon))
    assert type(e.value) is cls and e.value.code == code
    assert _keys(backend[1]) == before  # no blob, no record, no pending note
    assert registry.resolve("default", "sql") == v1 and serving.load(v1).sha256 == v1.sha256


@pytest.mark.parametrize("name", ["../evil", "a/b", "x\x00y", "/abs", "UPPER", "", "..", "a..b", "x" * 65])
def test_bad_names_write_nothing(backend, llama, name, tmp_path):
    spec, (good, _, _) = llama
    registry = Registry(backend[1], spec=spec, max_rank=MAX_RANK)
    with pytest.raises(errors.InvalidArgument, match="not valid"):
        registry.push("default", name, good)
    with pytest.raises(errors.InvalidArgument, match="not valid"):
        registry.push(name, "fine", good)
    assert _keys(backend[1]) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == (["registry"] if backend[0] == "local" else [])


def test_unexpected_files_and_bad_options(registry, llama):
    _, (good, _, _) = llama
    files = {n: (good / n).read_bytes() for n in check.ADAPTER_FILES}
    with pytest.raises(errors.InvalidArgument, match="unexpected file"):
        registry.push("default", "x", {**files, "../../etc/passwd": b"x"})
    with pytest.raises(errors.InvalidAdapter, match="no adapter_config.json"):
        registry.push("default", "x", {check.WEIGHTS_FILE: files[check.WEIGHTS_FILE]})
    with pytest.raises(errors.InvalidArgument, match="visibility"):
        registry.push("default", "x", good, visibility="everyone")
    assert _keys(registry.storage) == []


def test_symlink_out_of_the_root_is_refused(tmp_path, llama):
    spec, (good, _, _) = llama
    storage = LocalStorage(tmp_path / "registry")
    outside = tmp_path / "outside"
    outside.mkdir()
    (storage.root / "meta" / "default").mkdir(parents=True)
    os.symlink(outside, storage.root / "meta" / "default" / "evil")
    registry = Registry(storage, spec=spec, max_rank=MAX_RANK)
    with pytest.raises(errors.PermissionDenied, match="leads out of the registry root"):
        registry.push("default", "evil", good)
    assert list(outside.iterdir()) == []
    assert registry.push("default", "fine", good).version == 1


# ---- crashes ------------------------------------------------------------------------------

# A pushing process that stops for good in the middle of writing the weights blob (a half
# temp file locally, an unfinished multipart upload on S3), to be killed with -9 there.
_CRASHING_PUSH = r"""
import sys, time
from pathlib import Path
from adapterd.registry.storage import LocalStorage, S3Options, S3Storage
from adapterd.registry.store import Registry

kind, where, adapter = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if kind == "local":
    storage = LocalStorage(Path(where))
    def put(key, src):
        if isinstance(src, Path) and src.name.endswith(".safetensors"):
            with open(storage._tmp(), "wb") as f:
                f.write(src.read_bytes()[:1000])
            print("READY", flush=True)
            time.sleep(600)
        LocalStorage.put(storage, key, src)
else:
    import boto3
    endpoint, bucket = where.split("|")
    storage = S3Storage(bucket, "team/adapters", S3Options(endpoint, "us-east-1", "test", "test"))
    def put(key, src):
        if isinstance(src, Path) and src.name.endswith(".safetensors"):
            c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                             aws_access_key_id="test", aws_secret_access_key="test")
            up = c.create_multipart_upload(Bucket=bucket, Key=storage.prefix + key)
            c.upload_part(Bucket=bucket, Key=storage.prefix + key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1000)
            print("READY", flush=True)
            time.sleep(600)
        S3Storage.put(storage, key, src)
storage.put = put
Registry(storage).push("default", "sql", adapter)
"""


@pytest.mark.slow
def test_kill_9_mid_push_keeps_the_previous_version(backend, llama, request):
    kind, storage = backend
    spec, (a1, a2, _) = llama
    v1 = Registry(storage, spec=spec, max_rank=MAX_RANK).push("default", "sql", a1)
    before = set(_keys(storage))
    endpoint = request.getfixturevalue("s3_bucket")[0] if kind == "s3" else None
    where = str(storage.root) if kind == "local" else f"{endpoint}|{storage.bucket}"
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_PUSH, kind, where, str(a2)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # The previous version is intact and listed; no partial entry is visible.
    reg = Registry(storage, spec=spec, max_rank=MAX_RANK, stale_push_s=0 if kind == "s3" else 3600)
    assert reg.resolve("default", "sql") == v1 and reg.load(v1).sha256 == v1.sha256
    assert [v.ref for v in reg.list("default", all_versions=True)[0]] == ["sql@1"]
    assert set(_keys(storage)) > before  # the config blob and the pending note were left
    # The next start cleans the leftovers and publishes the next push as version 2.
    assert reg.clean_leftovers() >= 2
    assert set(_keys(storage)) == before
    if kind == "local":
        assert [p.name for p in (storage.root / ".tmp").iterdir()] == ["lock"]
    else:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        assert s3.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", []) == []
    assert reg.push("default", "sql", a2).version == 2


def test_leftovers_of_a_dead_server_are_cleaned_at_start(tmp_path, llama):
    """A server killed mid-upload leaves its staging directory and temp files in ROOT/.tmp."""
    import socket

    spec, (a1, _, _) = llama
    storage = LocalStorage(tmp_path / "registry")
    v1 = Registry(storage, spec=spec, max_rank=MAX_RANK).push("default", "sql", a1)
    dead = f"{socket.gethostname()}-999999999-{'0' * 32}"  # above any pid_max: not alive
    (storage.root / ".tmp" / f"{dead}.d").mkdir()
    (storage.root / ".tmp" / f"{dead}.d" / "adapter_model.safetensors").write_bytes(b"half")
    (storage.root / ".tmp" / dead).write_bytes(b"half a blob")
    with storage.staging_dir() as live:  # a live upload of this process is left alone
        reg = Registry(storage, spec=spec, max_rank=MAX_RANK)
        assert reg.clean_leftovers() == 2
        assert sorted(p.name for p in (storage.root / ".tmp").iterdir()) == sorted(["lock", live.name])
    assert reg.resolve("default", "sql") == v1


def test_unreachable_s3_is_unavailable(llama):
    import socket

    import boto3
    from botocore.config import Config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    spec, (a1, _, _) = llama
    registry = Registry(S3Storage("b", "p", client=client), spec=spec, max_rank=MAX_RANK)
    with pytest.raises(errors.Unavailable, match="adapter registry s3://b/p/"):
        registry.resolve("default", "sql")
    with pytest.raises(errors.Unavailable):
        registry.push("default", "sql", a1)


def test_missing_bucket_is_unavailable_and_says_so(s3_endpoint):
    registry = Registry(S3Storage("no-such-bucket", "", S3Options(s3_endpoint, "us-east-1", "test", "test")))
    with pytest.raises(errors.Unavailable, match="NoSuchBucket"):
        registry.clean_leftovers()
