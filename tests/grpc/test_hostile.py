"""The hostile matrix (issue 18): what a hostile tenant and a careless client tried, over a
real channel, each answered with a precise code and a short message, the server serving on.

One server for the module, two tenants (alice, bob) and upload limits of 2 per tenant and
3 in all; the job manager is not started, so jobs stay queued and no worker is spawned.
Tests that need other settings (an idle timeout of a fraction of a second, a process to
signal) start their own. Sections follow the issue's items:

    1 tenancy of failures   2 control characters   3 non-finite adapters   4 WatchJob
    5 INTERNAL where a precise code belongs        6 resource holding      7 smaller ones

Item 8, the metrics port, is tests/unit/test_metrics.py::test_the_metrics_port_serves_only_metrics.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import adapterd_rules as check
import grpc
import pytest
from adapterctl.adapters import AdaptersClient, adapter_files, push_requests
from adapterctl.client import Client, auth_metadata
from adapterctl.train import TrainingClient
from adapterd.auth import hash_token
from adapterd.config import AuthConfig, CacheConfig, TrainingConfig, UploadConfig
from adapterd.registry.storage import LocalStorage
from adapterd.registry.store import Registry, RegistryResolver, blob_key
from adapterd.training import registry_publisher
from adapterd.training.jobs import JobManager
from adapterd_api.v1 import adapters_pb2 as apb
from adapterd_api.v1 import inference_pb2 as ipb
from adapterd_api.v1 import inference_pb2_grpc as ipb_grpc
from adapterd_api.v1 import training_pb2 as tpb
from safetensors.torch import load_file, save_file

from tests.grpc_harness import RunningServer, request

MAX_RANK = 16
TOKENS = {"alice": "tok-alice", "bob": "tok-bob"}
AUTH = "".join(f"""
[tenants.{who}]
[[tenants.{who}.tokens]]
hash = "{hash_token(token)}"
role = "user"
""" for who, token in TOKENS.items())
UPLOADS = UploadConfig(idle_timeout_s=60, max_uploads=3, max_uploads_per_tenant=2)
SHORT = 1000  # characters: the most any error message here may be


def _start(parts_for, tiny_base, root: Path, uploads: UploadConfig) -> RunningServer:
    root.mkdir(parents=True, exist_ok=True)
    (root / "auth.toml").write_text(AUTH)
    registry = Registry(LocalStorage(root / "registry"), max_rank=MAX_RANK, max_bytes=1 << 30, deleted_grace_s=0)
    parts = parts_for(4)
    jobs = JobManager(TrainingConfig(jobs_dir=root / "jobs"), base_model=tiny_base, max_rank=MAX_RANK,
                      publish=registry_publisher(registry), tokenizer=parts.tokenizer,
                      module_names=parts.spec.linear_shapes)
    server = RunningServer.start(parts, RegistryResolver(registry), registry=registry, jobs=jobs,
                                 cache=CacheConfig(gpu_slots=4, max_rank=MAX_RANK),
                                 auth=AuthConfig(root / "auth.toml"), uploads=uploads)
    server.root = root
    return server


@pytest.fixture(scope="module")
def server(parts_for, tiny_base, adapter_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    s = _start(parts_for, tiny_base, root, UPLOADS)
    s.good = adapter_factory(tiny_base, "llama", seed=1800, rank=4, alpha=8)
    s.other = adapter_factory(tiny_base, "llama", seed=1801, rank=4, alpha=8)
    s.dataset = root / "train.jsonl"
    s.dataset.write_text("".join(json.dumps({"prompt": f"Q: {i}?\nA: ", "completion": str(i)}) + "\n" for i in range(8)))
    yield s
    s.stop()
    s.jobs.close()


def md(who: str) -> tuple[tuple[str, str], ...]:
    return auth_metadata(TOKENS[who])


def adapters_as(server, who: str) -> AdaptersClient:
    return AdaptersClient(Client(server.addr, metadata=md(who), timeout=60))


def training_as(server, who: str) -> TrainingClient:
    return TrainingClient(Client(server.addr, metadata=md(who), timeout=60))


def generate_as(server, who: str, adapter: str = "", **params):
    params.setdefault("max_new_tokens", 4)
    return ipb_grpc.InferenceStub(server.channel).Generate(request("hostile", adapter, **params),
                                                          metadata=md(who), timeout=60)


def status(fn, *args, **kw) -> tuple[str, str]:
    """(code name, details) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value.code().name, info.value.details() or ""


def push_raw(server, who: str, requests, timeout: float = 60):
    return server.adapters.PushAdapter(requests, metadata=md(who), timeout=timeout)


def variant(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of the adapter `src` with config keys changed and/or tensors mapped."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / check.CONFIG_FILE).read_text())
        cfg.update(config)
        (dst / check.CONFIG_FILE).write_text(json.dumps(cfg))
    if tensors is not None:
        weights = load_file(dst / check.WEIGHTS_FILE)
        save_file({k: tensors(k, v) for k, v in weights.items()}, dst / check.WEIGHTS_FILE)
    return dst


class Held:
    """A request iterator that sends `first` messages and then nothing until released (or
    `hold_s` passes): a client that goes quiet in the middle of an upload."""

    def __init__(self, *first, hold_s: float = 30):
        self.first, self.hold_s = first, hold_s
        self.released = threading.Event()
        self.sent = 0

    def __iter__(self):
        for message in self.first:
            self.sent += 1
            yield message
        self.released.wait(self.hold_s)

    def release(self):
        self.released.set()


def spools(server) -> list[Path]:
    """The staging directories of the pushes in progress (inside the registry root)."""
    return sorted((server.registry.storage.root / ".tmp").glob("*.d"))


def wait_until(predicate, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def header(name="held", files=((check.CONFIG_FILE, 10), (check.WEIGHTS_FILE, 10)), sha="", **kw):
    return apb.PushAdapterRequest(header=apb.PushHeader(
        name=name, files=[apb.FileInfo(name=n, size=s, sha256=sha) for n, s in files], **kw))


def chunk(data: bytes):
    return apb.PushAdapterRequest(chunk=apb.FileChunk(data=data))


# ---- 1: a failure is remembered per version, and names only what the caller asked for -----


def test_a_failed_load_is_per_version_and_never_names_another_tenants_adapter(server, tiny_base, adapter_factory):
    alice, bob = adapters_as(server, "alice"), adapters_as(server, "bob")
    shared = adapter_factory(tiny_base, "llama", seed=1802, rank=4, alpha=8)  # no other test's content
    secret = alice.push(shared, "secretx")
    weights = next(f for f in secret.files if f.name == check.WEIGHTS_FILE)
    blob = server.registry.storage.root / blob_key(weights.sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    code, details = status(generate_as, server, "alice", "secretx")
    assert code == "DATA_LOSS" and "secretx" in details
    # Bob pushes the very same bytes under his own name: his push is new, it works, and no
    # answer of his names alice's adapter.
    mine = bob.push(shared, "mine")
    assert mine.sha256 == secret.sha256
    assert generate_as(server, "bob", "mine").completion_tokens >= 1
    # Alice follows the message's advice (delete, push again): the new version serves at once.
    alice.delete("secretx")
    assert alice.push(shared, "secretx").version == 2
    assert generate_as(server, "alice", "secretx").completion_tokens >= 1
    bob.delete("mine")
    alice.delete("secretx")


# ---- 2: control characters ------------------------------------------------------------------


@pytest.mark.parametrize("description", [
    "evil\x1b]0;pwned\x07\x1b[2J", "line\rover", "nul\x00", "two\nlines", "csi\x9b2J", "sep\u2028",
])
def test_control_characters_in_a_description_are_refused_naming_the_field(server, description):
    ctl = adapters_as(server, "alice")
    code, details = status(push_raw, server, "alice",
                           push_requests(adapter_files(server.good), "described", description=description))
    assert code == "INVALID_ARGUMENT" and "description" in details and "control character" in details
    assert "\x1b" not in details
    code, details = status(training_as(server, "alice").create, server.dataset, name="described",
                           description=description)
    assert code == "INVALID_ARGUMENT" and "--description" in details
    assert [a.name for a in ctl.list(name="described")] == []
    # Printable text, accents and all, is a description.
    fine = ctl.push(server.good, "described", description="Résumés → SQL, « précis »", check_first=False)
    assert ctl.get("described").description == fine.description == "Résumés → SQL, « précis »"
    ctl.delete("described")


# ---- 3: adapters that cannot give finite outputs ------------------------------------------


@pytest.mark.parametrize("case, config, tensors, fragment", [
    ("alpha-1e308", {"lora_alpha": 1e308}, None, "scaling"),
    ("alpha-1e30", {"lora_alpha": 1e30}, None, "scaling"),
    ("weights-1e30", None, lambda k, v: v * 1e30 if "lora_A" in k else v, "above the limit"),
    ("delta", None, lambda k, v: v * 300, "lora_B @ lora_A"),
])
def test_adapters_that_cannot_give_finite_outputs_are_refused_at_push(server, tmp_path, case, config, tensors,
                                                                      fragment):
    bad = variant(server.good, tmp_path / case, config, tensors)
    code, details = status(adapters_as(server, "alice").push, bad, "overflow", check_first=False)
    assert code == "INVALID_ARGUMENT" and fragment in details and "finite" in details, details
    assert [a.name for a in adapters_as(server, "alice").list(name="overflow")] == []


def test_a_training_spec_whose_alpha_overflows_is_refused_before_any_upload(server):
    training = training_as(server, "alice")
    for alpha in (1e30, 1e38):
        # The spec alone, then silence: the refusal comes before the dataset.
        spec = tpb.JobSpec(name="overflow", hyperparameters=tpb.Hyperparameters(alpha=alpha))
        held = Held(tpb.CreateJobRequest(spec=spec))
        started = time.monotonic()
        code, details = status(training.stub.CreateJob, iter(held), metadata=md("alice"), timeout=20)
        held.release()
        assert code == "INVALID_ARGUMENT" and "--alpha" in details and "scaling" in details, details
        assert time.monotonic() - started < 10
    assert [j for j in training.list() if j.name == "overflow"] == []


# ---- 4: WatchJob ------------------------------------------------------------------------------


def test_watch_job_on_a_finished_job_ends_at_once_and_after_seq_is_bounded(server):
    training = training_as(server, "alice")
    job = training.create(server.dataset, name="watched")
    training.cancel(job.id)
    events = list(training.watch(job.id))
    assert [e.state for e in events if e.type == tpb.STATE][-1] == tpb.CANCELLED
    last = events[-1].seq
    started = time.monotonic()
    assert list(training.stub.WatchJob(tpb.WatchJobRequest(job_id=job.id, after_seq=last),
                                       metadata=md("alice"), timeout=8)) == []
    assert [e.seq for e in training.stub.WatchJob(tpb.WatchJobRequest(job_id=job.id, after_seq=last - 1),
                                                  metadata=md("alice"), timeout=8)] == [last]
    assert list(training.stub.WatchJob(tpb.WatchJobRequest(job_id=job.id, after_seq=last + 100),
                                       metadata=md("alice"), timeout=8)) == []
    assert time.monotonic() - started < 6
    for after in (2**63, 2**64 - 1):
        code, details = status(lambda a: list(training.stub.WatchJob(
            tpb.WatchJobRequest(job_id=job.id, after_seq=a), metadata=md("alice"), timeout=8)), after)
        assert code == "INVALID_ARGUMENT" and "after_seq" in details


# ---- 5: INTERNAL where a precise code belongs --------------------------------------------------

DEEP = b"[" * 100_000


def test_deeply_nested_json_is_invalid_argument_naming_the_file_or_line(server, tmp_path):
    nested_header = variant(server.good, tmp_path / "header")
    (nested_header / check.WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(DEEP)) + DEEP)
    nested_config = variant(server.good, tmp_path / "config")
    (nested_config / check.CONFIG_FILE).write_bytes(DEEP)
    for directory, file_name in ((nested_header, check.WEIGHTS_FILE), (nested_config, check.CONFIG_FILE)):
        code, details = status(push_raw, server, "alice", push_requests(adapter_files(directory), "nested"))
        assert code == "INVALID_ARGUMENT" and file_name in details and "deeply" in details, details
    data = tmp_path / "nested.jsonl"
    data.write_bytes(server.dataset.read_bytes() + DEEP + b"\n")
    code, details = status(training_as(server, "alice").create, data, name="nested")
    assert code == "INVALID_ARGUMENT" and "training file line 9" in details and "deeply" in details
    token = base64.urlsafe_b64encode(DEEP).decode()
    code, details = status(server.adapters.ListAdapters, apb.ListAdaptersRequest(page_token=token),
                           metadata=md("alice"), timeout=30)
    assert code == "INVALID_ARGUMENT" and "page_token" in details


class _RefusingDisk:
    """os.open / os.mkdir that fail with `err` for paths under `root` when they would write."""

    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def __init__(self, monkeypatch, root: Path, err: int, *, after: int = 0):
        self.root, self.err, self.after, self.calls = str(root), err, after, 0
        self._open, self._mkdir = os.open, os.mkdir
        monkeypatch.setattr(os, "open", self.open)
        monkeypatch.setattr(os, "mkdir", self.mkdir)

    def _refuse(self, path) -> bool:
        if not str(path).startswith(self.root):
            return False
        self.calls += 1
        return self.calls > self.after

    def open(self, path, flags, *args, **kw):
        if flags & self.WRITE and self._refuse(path):
            raise OSError(self.err, os.strerror(self.err), str(path))
        return self._open(path, flags, *args, **kw)

    def mkdir(self, path, *args, **kw):
        if self._refuse(path):
            raise OSError(self.err, os.strerror(self.err), str(path))
        return self._mkdir(path, *args, **kw)


@pytest.mark.parametrize("err, code, fragment", [
    (errno.EROFS, "FAILED_PRECONDITION", "read-only"),
    (errno.EACCES, "FAILED_PRECONDITION", "permission denied"),
    (errno.EPERM, "FAILED_PRECONDITION", "immutable"),
    (errno.ENOSPC, "RESOURCE_EXHAUSTED", "no space left"),
])
def test_a_registry_that_refuses_writes_is_a_precise_code_naming_it(server, monkeypatch, err, code, fragment):
    alice = adapters_as(server, "alice")
    kept = alice.push(server.good, "kept")
    root = server.registry.storage.root
    with monkeypatch.context() as m:
        _RefusingDisk(m, root, err)
        got, details = status(alice.push, server.good, "refused", check_first=False)
        assert (got, fragment in details, str(root) in details) == (code, True, True), details
        got, details = status(alice.delete, "kept")
        assert (got, str(root) in details) == (code, True), details
    assert [a.name for a in alice.list(name="refused")] == []
    assert generate_as(server, "alice", "kept").completion_tokens >= 1  # reads still work
    alice.delete(kept.ref.split("/", 1)[1])


def test_unparseable_request_bytes_are_invalid_argument_without_a_class_name(server):
    generate = server.channel.unary_unary("/adapterd.v1.Inference/Generate")  # bytes in, bytes out
    bad_utf8 = b"\x12\x02\xff\xfe"  # field 2 (prompt), a string, as bytes that are not UTF-8
    for raw in (bad_utf8, b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f"):
        code, details = status(generate, raw, metadata=md("alice"), timeout=30)
        assert code == "INVALID_ARGUMENT" and "UTF-8" in details, details
        assert "Error" not in details and "Exception" not in details and "Decode" not in details
    push = server.channel.stream_unary("/adapterd.v1.Adapters/PushAdapter")
    code, details = status(push, iter([b"\xff\xff\xff\xff"]), metadata=md("alice"), timeout=30)
    assert code == "INVALID_ARGUMENT" and "protobuf" in details
    assert generate_as(server, "alice").completion_tokens >= 1


# ---- 6: resource holding ------------------------------------------------------------------------


def test_concurrent_uploads_are_capped_per_tenant_and_in_all(server):
    held = [Held(header(f"held{i}")) for i in range(3)]
    calls = [server.adapters.PushAdapter.future(iter(held[0]), metadata=md("alice"), timeout=60),
             server.adapters.PushAdapter.future(iter(held[1]), metadata=md("alice"), timeout=60)]
    try:
        wait_until(lambda: len(spools(server)) == 2, "two uploads in progress")
        code, details = status(push_raw, server, "alice", iter([header("third")]))
        assert code == "RESOURCE_EXHAUSTED" and "--max-uploads-per-tenant" in details
        calls.append(server.adapters.PushAdapter.future(iter(held[2]), metadata=md("bob"), timeout=60))
        wait_until(lambda: len(spools(server)) == 3, "three uploads in progress")
        code, details = status(push_raw, server, "bob", iter([header("fourth")]))
        assert code == "RESOURCE_EXHAUSTED" and "--max-uploads" in details
        # Training uploads take the same places.
        code, details = status(training_as(server, "bob").create, server.dataset, name="queued")
        assert code == "RESOURCE_EXHAUSTED" and "--max-uploads" in details
    finally:
        for h in held:
            h.release()
        for call in calls:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=30)  # each ends short of its declared bytes
    wait_until(lambda: not spools(server), "the uploads' staging directories to go")
    pushed = adapters_as(server, "alice").push(server.good, "after-cap")
    assert pushed.version == 1
    adapters_as(server, "alice").delete("after-cap")


def test_an_idle_upload_is_ended_and_leaves_nothing(parts_for, tiny_base, adapter_factory, tmp_path):
    s = _start(parts_for, tiny_base, tmp_path, UploadConfig(idle_timeout_s=0.5, max_uploads=3,
                                                            max_uploads_per_tenant=2))
    try:
        pushes = Held(header("idle"), chunk(b"{"))
        started = time.monotonic()
        code, details = status(push_raw, s, "alice", iter(pushes))
        pushes.release()
        assert code == "RESOURCE_EXHAUSTED" and "--upload-idle-timeout" in details
        assert time.monotonic() - started < 10
        assert not spools(s)
        job = Held(tpb.CreateJobRequest(spec=tpb.JobSpec(name="idle")))
        code, details = status(TrainingClient(Client(s.addr)).stub.CreateJob, iter(job), metadata=md("alice"),
                               timeout=30)
        job.release()
        assert code == "RESOURCE_EXHAUSTED" and "--upload-idle-timeout" in details
        # An upload that keeps moving is not cut off, and the places were given back.
        good = adapter_factory(tiny_base, "llama", seed=1800, rank=4, alpha=8)
        assert AdaptersClient(Client(s.addr, metadata=md("alice"))).push(good, "moving").version == 1
    finally:
        s.stop()
        s.jobs.close()


def test_a_failed_push_leaves_no_orphaned_blob(server, monkeypatch):
    root = server.registry.storage.root
    before = sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())
    real_open, created = os.open, []

    def disk_fills(path, flags, *args, **kw):
        # The registry's temp files: the pending note and the config's blob are written,
        # then the disk is full for the weights' blob.
        if str(path).startswith(str(root / ".tmp")) and flags & os.O_EXCL:
            created.append(path)
            if len(created) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "open", disk_fills)
        code, details = status(adapters_as(server, "alice").push, server.other, "orphan", check_first=False)
    assert len(created) >= 3
    after = sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())
    assert after == before  # the config's blob, written before the failure, is gone
    assert list((root / "pending").glob("*")) == []
    assert code == "RESOURCE_EXHAUSTED" and "no space left" in details
    assert [a.name for a in adapters_as(server, "alice").list(name="orphan")] == []


def test_an_invalid_safetensors_header_is_refused_at_its_first_bytes(server):
    config = (server.good / check.CONFIG_FILE).read_bytes()
    size = 600 << 20
    for start, fragment in ((struct.pack("<Q", 1 << 40), "limit"), (struct.pack("<Q", 64) + b"x" * 64, "JSON")):
        held = Held(header("huge", files=((check.CONFIG_FILE, len(config)), (check.WEIGHTS_FILE, size))),
                    chunk(config + start + b"\0" * (64 << 10)))
        started = time.monotonic()
        code, details = status(push_raw, server, "alice", iter(held))
        held.release()
        assert code == "INVALID_ARGUMENT" and check.WEIGHTS_FILE in details and fragment in details, details
        assert time.monotonic() - started < 10
    wait_until(lambda: not spools(server), "the staging directories to go")


def test_a_declared_sha256_that_is_not_64_hex_digits_is_refused_at_once(server):
    for sha in ("abc", "g" * 64, "0" * 63, "0" * 65):
        held = Held(header("hashed", sha=sha))
        code, details = status(push_raw, server, "alice", iter(held), timeout=20)
        held.release()
        assert code == "INVALID_ARGUMENT" and "64 hex digits" in details and held.sent == 1


# ---- 7: smaller ones ------------------------------------------------------------------------------


def test_errors_echo_only_a_short_escaped_prefix_of_the_input(server):
    huge = "a" * 100_000
    calls = [
        lambda: generate_as(server, "alice", huge),
        lambda: generate_as(server, "alice", "\x1b[2J" + huge),
        lambda: adapters_as(server, "alice").get(huge),
        lambda: adapters_as(server, "alice").delete(huge + "@1"),
        lambda: push_raw(server, "alice", iter([header(huge)])),
        lambda: training_as(server, "alice").get("ftjob-" + huge),
        lambda: training_as(server, "alice").create(server.dataset, name=huge),
    ]
    for call in calls:
        code, details = status(call)
        assert code in ("INVALID_ARGUMENT", "NOT_FOUND") and len(details) < SHORT, (code, len(details))
        assert "\x1b" not in details


def test_seeds_the_sampler_cannot_tell_apart_are_refused(server):
    ok = generate_as(server, "alice", temperature=1.0, seed=2**63 - 1)
    assert ok.completion_tokens >= 1
    for seed in (2**63, 2**64 - 1):
        code, details = status(generate_as, server, "alice", temperature=1.0, seed=seed)
        assert code == "INVALID_ARGUMENT" and "params.seed" in details


def test_list_page_sizes_above_the_limit_are_refused(server):
    stub = training_as(server, "alice").stub
    assert stub.ListJobs(tpb.ListJobsRequest(page_size=100), metadata=md("alice"), timeout=30) is not None
    code, details = status(stub.ListJobs, tpb.ListJobsRequest(page_size=101), metadata=md("alice"), timeout=30)
    assert code == "INVALID_ARGUMENT" and "1..100" in details


def test_lenient_parses_are_refused(server, tmp_path):
    alice = adapters_as(server, "alice")
    alice.push(server.good, "strict")
    assert generate_as(server, "alice", "strict@1").adapter == "strict@1"
    for ref in ("strict@01", "strict@+1", "strict@1 ", "strict@١"):
        code, details = status(generate_as, server, "alice", ref)
        assert code == "INVALID_ARGUMENT" and "leading zeros" in details, (ref, details)
    code, details = status(push_raw, server, "alice", iter([header("strict", visibility=99)]))
    assert code == "INVALID_ARGUMENT" and "visibility 99" in details
    for field in ("visibility", "source"):
        code, details = status(server.adapters.ListAdapters, apb.ListAdaptersRequest(**{field: 99}),
                               metadata=md("alice"), timeout=30)
        assert code == "INVALID_ARGUMENT" and f"{field} 99" in details
    code, details = status(training_as(server, "alice").stub.ListJobs, tpb.ListJobsRequest(states=[99]),
                           metadata=md("alice"), timeout=30)
    assert code == "INVALID_ARGUMENT" and "99 is not a job state" in details
    lower = variant(server.good, tmp_path / "lower", {"peft_type": "lora"})
    code, details = status(alice.push, lower, "lower", check_first=False)
    assert code == "INVALID_ARGUMENT" and '"LORA"' in details
    alice.delete("strict")


def test_target_modules_that_disagree_with_the_tensors_are_refused(server, tmp_path):
    narrow = variant(server.good, tmp_path / "narrow", {"target_modules": ["q_proj", "v_proj"]})
    code, details = status(adapters_as(server, "alice").push, narrow, "narrow", check_first=False)
    assert code == "INVALID_ARGUMENT" and "target_modules" in details and "mlp.down_proj" in details, details
    # The same check runs in adapterctl before the upload.
    with pytest.raises(check.InvalidAdapter, match="target_modules"):
        check.check_adapter(*check.read_adapter_dir(narrow))
    # A suffix naming the module is what PEFT matches too.
    cfg = json.loads((server.good / check.CONFIG_FILE).read_text())
    dotted = variant(server.good, tmp_path / "dotted",
                     {"target_modules": [f"self_attn.{t}" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else t
                                         for t in cfg["target_modules"]]})
    assert adapters_as(server, "alice").push(dotted, "dotted", check_first=False).version == 1
    adapters_as(server, "alice").delete("dotted")


def test_a_second_sigterm_during_the_drain_exits_at_once(tiny_base, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterd", "serve", "--port", "0", "--port-file", str(port_file),
         "--base-model", str(tiny_base), "--registry", str(tmp_path / "registry"), "--max-rank", "16",
         "--gpu-slots", "2", "--max-input-tokens", "64", "--max-total-tokens", "256",
         "--grace-period", "120", "--upload-idle-timeout", "120", "--metrics-port", "0",
         "--jobs-dir", str(tmp_path / "jobs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    held = Held(header("slow"), hold_s=120)
    try:
        wait_until(port_file.exists, "the port file", timeout=120)
        addr = f"127.0.0.1:{port_file.read_text().strip()}"
        with Client(addr, timeout=2) as client:
            wait_until(lambda: _healthy(client), "SERVING", timeout=120)
        channel = grpc.insecure_channel(addr)
        call = apb_stub(channel).PushAdapter.future(iter(held), timeout=180)  # in flight: the drain waits
        wait_until(lambda: list((tmp_path / "registry" / ".tmp").glob("*.d")), "the upload to start")
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert proc.poll() is None, "the first SIGTERM must drain, not exit"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 10
        assert "exiting now" in proc.stdout.read()
        held.release()
        with pytest.raises(grpc.RpcError):
            call.result(timeout=30)
        channel.close()
    finally:
        held.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _healthy(client: Client) -> bool:
    try:
        return client.health() == "SERVING"
    except grpc.RpcError:
        return False


def apb_stub(channel):
    from adapterd_api.v1 import adapters_pb2_grpc

    return adapters_pb2_grpc.AdaptersStub(channel)


def test_generate_request_with_a_bad_field_number_type_still_parses(server):
    """Unknown fields are not an error (protobuf's forward compatibility): only bytes that
    cannot be parsed are."""
    raw = ipb.GenerateRequest(prompt="hostile", params=ipb.GenerationParams(max_new_tokens=2)).SerializeToString()
    raw += b"\xf8\x07\x01"  # field 127, varint 1: unknown to this server
    reply = server.channel.unary_unary("/adapterd.v1.Inference/Generate")(raw, metadata=md("alice"), timeout=30)
    assert ipb.GenerateResponse.FromString(reply).completion_tokens >= 1

