"""The adapter registry: immutable, numbered versions of named adapters, per tenant.

Layout in a Storage (storage.py), every object written once:

    blobs/<ab>/<sha256>                       file contents, content-addressed
    meta/<tenant>/<name>/<00000003>.json      version record: what name@3 is (its files'
                                              sha256s, rank, base model, source, ...)
    meta/<tenant>/<name>/<00000003>.deleted   tombstone: name@3 was deleted
    pending/<host>-<pid>-<id>.json            a push in progress and the blobs it writes

A push checks the files against the served base model, writes the pending note, the
blobs, and then the record last with create-if-absent: the record is the publication,
so a crash before it leaves nothing visible and the previous version untouched, and two
replicas racing on one name get N+1 and N+2. A deleted version keeps its record and gains
a tombstone, so its number is never reused: a client pinned to name@3 can never be given
other weights. Blobs no live record or live push refers to are removed after a delete
and at start.

Reading verifies every file's sha256 (ChecksumMismatch, DATA_LOSS, for that adapter only).
Records are immutable, so they are cached forever; the listing of a name is cached for
`list_ttl_s` (0 for a local directory, a second or two for S3, so that pushes on another
replica show up that fast).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import adapterd_rules as rules

from adapterd import errors
from adapterd.registry.storage import (
    LocalStorage,
    ObjectInfo,
    S3Options,
    S3Storage,
    Storage,
    StorageMissing,
    _pid_alive,
    open_storage,
)
from adapterd.registry.validate import AdapterWeights, load_adapter_files
from adapterd.resolve import ResolvedAdapter

__all__ = ["AdapterVersion", "Registry", "RegistryResolver", "Storage", "LocalStorage", "S3Storage", "S3Options", "open_storage"]

log = logging.getLogger(__name__)

VISIBILITIES = ("private", "public")
SOURCES = ("pushed", "trained")
_VERSION_DIGITS = 8


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable version of an adapter: the record written at push."""

    tenant: str
    name: str
    version: int
    sha256: str  # adapter_digest of the files: the content identity caches key by
    files: dict[str, FileEntry]
    size: int
    rank: int
    alpha: float
    scaling: float
    target_modules: list[str]
    base_model: str  # the served base model's name at push
    base_identity: str  # and its identity (sha256 of its config.json)
    trained_on: str  # base_model_name_or_path from adapter_config.json, informational
    created_at: float
    description: str = ""
    visibility: str = "private"
    source: str = "pushed"
    job_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    kind: str = "lora"  # adapterd_rules.KINDS; records from before other kinds were served are LoRA
    virtual_tokens: int = 0  # prompt and prefix tuning

    @property
    def ref(self) -> str:
        """"name@3": what a response names as what served it."""
        return f"{self.name}@{self.version}"

    @property
    def full_ref(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AdapterVersion:
        d = json.loads(data)
        d["files"] = {k: FileEntry(**v) for k, v in d["files"].items()}
        return cls(**d)


def blob_key(sha256: str) -> str:
    return f"blobs/{sha256[:2]}/{sha256}"


def _record_key(tenant: str, name: str, version: int, suffix: str = "json") -> str:
    return f"meta/{tenant}/{name}/{version:0{_VERSION_DIGITS}d}.{suffix}"


@dataclass
class _NameState:
    versions: list[int]  # every version ever published, deleted ones included
    deleted: dict[int, float]  # version -> when its tombstone was written
    at: float  # when listed


class Registry:
    def __init__(
        self,
        storage: Storage,
        *,
        spec=None,
        max_rank: int | None = None,
        max_bytes: int | None = None,
        max_virtual_tokens: int | None = None,
        list_ttl_s: float = 0.0,
        stale_push_s: float = 3600.0,
        deleted_grace_s: float = 60.0,
        require_spec: bool = False,
    ):
        """`spec`: the served base model (a ModelSpec); pushes are checked against it and
        loads refuse adapters pushed for another base. `stale_push_s`: a pending push older
        than this is taken as dead (another host's writer cannot be asked). `deleted_grace_s`:
        the files of a deleted version stay this long, so requests that resolved it just
        before the delete still load it and finish. `require_spec`: refuse pushes (UNAVAILABLE)
        until `spec` is set, instead of checking them without a base model."""
        self.storage = storage
        self.spec = spec
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.max_virtual_tokens = max_virtual_tokens
        self.list_ttl_s = list_ttl_s
        self.stale_push_s = stale_push_s
        self.deleted_grace_s = deleted_grace_s
        self.require_spec = require_spec
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str, int], AdapterVersion] = {}
        self._names: dict[tuple[str, str], _NameState] = {}

    # ---- push -----------------------------------------------------------------------------

    def push(
        self,
        tenant: str,
        name: str,
        files: Path | Mapping[str, bytes | Path],
        *,
        sha256: Mapping[str, str] | None = None,
        description: str = "",
        visibility: str = "private",
        source: str = "pushed",
        job_id: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> AdapterVersion:
        """Check and publish `files` (an adapter directory, or {file name: bytes or path})
        as the next version of tenant/name. `sha256`: {file name: hex digest} of files the
        caller hashed as they arrived (a push), so that no file is read twice to hash it."""
        self._check_names(tenant, name)
        if self.spec is None and self.require_spec:
            raise errors.Unavailable("the base model is not loaded yet, and pushes are checked against it; retry shortly")
        if visibility not in VISIBILITIES:
            raise errors.InvalidArgument(f"visibility must be one of {VISIBILITIES}; got {rules.quote(visibility)}")
        if source not in SOURCES:
            raise errors.InvalidArgument(f"source must be one of {SOURCES}; got {rules.quote(source)}")
        rules.check_text(description, "description")
        config_bytes, weights = self._adapter_files(files)
        contents = {rules.CONFIG_FILE: config_bytes, rules.WEIGHTS_FILE: weights}
        entries = {n: _file_entry(c, (sha256 or {}).get(n)) for n, c in contents.items()}
        digest = rules.adapter_digest({n: e.sha256 for n, e in entries.items()})
        # Load the tensors too: catches NaN/inf and anything the header check cannot see.
        if self.spec is not None:
            adapter = load_adapter_files(config_bytes, weights, self.spec, self.max_rank, sha256=digest,
                                         max_bytes=self.max_bytes, max_virtual_tokens=self.max_virtual_tokens)
            rank, alpha, scaling, targets = adapter.rank, adapter.alpha, adapter.scaling, adapter.target_modules
            kind, virtual = adapter.kind, adapter.virtual_tokens
        else:
            checked = rules.check_adapter(config_bytes, weights, max_rank=self.max_rank, max_bytes=self.max_bytes,
                                          max_virtual_tokens=self.max_virtual_tokens)
            s = checked.settings
            rank, alpha, scaling, targets = s.rank, s.alpha, s.scaling, checked.target_modules
            kind, virtual = checked.kind, checked.virtual_tokens
        try:
            with self.storage.push_lock():
                version = self._write(tenant, name, contents, entries, digest, dict(
                    size=sum(e.size for e in entries.values()), rank=rank, alpha=alpha, scaling=scaling,
                    target_modules=targets, description=description, visibility=visibility,
                    source=source, job_id=job_id, metrics=dict(metrics or {}), kind=kind, virtual_tokens=virtual,
                    trained_on=str(json.loads(config_bytes).get("base_model_name_or_path") or ""),
                ))
        except BaseException:
            # Outside the push lock (the sweep takes it exclusively): the blobs this push wrote
            # and no version refers to go now, not at the next start (a full disk, a store
            # that failed half-way).
            self._sweep_quietly()
            raise
        log.info("pushed %s (%s, %s, %d bytes, rank %d)", version.full_ref, kind, digest[:12], version.size, rank)
        return version

    def _write(self, tenant, name, contents, entries, digest, fields) -> AdapterVersion:
        """Pending note, blobs, then the record: the record is the publication."""
        blobs = [e.sha256 for e in entries.values()]
        pending = self._begin_push(blobs)
        try:
            for n, c in contents.items():
                self.storage.put(blob_key(entries[n].sha256), c)
            record = dict(
                tenant=tenant, name=name, sha256=digest, files=entries, created_at=time.time(),
                base_model=getattr(self.spec, "name", ""), base_identity=getattr(self.spec, "identity", ""),
                **fields,
            )
            version = self._publish(tenant, name, record)
            # A delete's blob sweep on another replica could in theory have removed a blob
            # between our put and our record; the record is public now, so make sure.
            for n, c in contents.items():
                if not self.storage.exists(blob_key(entries[n].sha256)):
                    self.storage.put(blob_key(entries[n].sha256), c)
        except BaseException:
            self._abandon_push(pending, blobs)
            raise
        self.storage.delete(pending)
        return version

    def _abandon_push(self, pending: str, blobs: list[str]) -> None:
        """Mark a failed push's note as dead, so the next sweep (at once: see push) removes
        the blobs it wrote that nothing else refers to, on S3 too, where a sweep otherwise
        keeps recent blobs. If even the note cannot be written, drop it: a local sweep is
        exact without it."""
        note = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "blobs": blobs,
                "failed": True}
        try:
            self.storage.put(pending, json.dumps(note).encode())
        except Exception:  # noqa: BLE001 - the push's own error is the one to report
            try:
                self.storage.delete(pending)
            except Exception:  # noqa: BLE001
                log.warning("registry %s: could not remove the note %s of a failed push", self.storage.url, pending)

    @staticmethod
    def _check_names(tenant: str, name: str) -> None:
        rules.check_name(tenant, "tenant")
        rules.check_name(name)

    @staticmethod
    def _adapter_files(files: Path | Mapping[str, bytes | Path]) -> tuple[bytes, bytes | Path]:
        if isinstance(files, (str, Path)):
            return rules.read_adapter_dir(Path(files))
        names = set(files)
        # A pickle beside the safetensors file, or a model card, is left out, not refused.
        rules.require_adapter_files(names, ignored=set(rules.PICKLED_FILES) | {"README.md"})
        config = files[rules.CONFIG_FILE]
        config_bytes = Path(config).read_bytes() if isinstance(config, (str, Path)) else bytes(config)
        weights = files[rules.WEIGHTS_FILE]
        return config_bytes, Path(weights) if isinstance(weights, str) else weights

    def _begin_push(self, blobs: list[str]) -> str:
        key = f"pending/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}.json"
        note = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "blobs": blobs}
        self.storage.put(key, json.dumps(note).encode())
        return key

    def _publish(self, tenant: str, name: str, record: dict) -> AdapterVersion:
        """Write the record as the next free version number (create-if-absent, retried)."""
        state = self._name_state(tenant, name, fresh=True)
        version = (state.versions[-1] if state.versions else 0) + 1
        for _ in range(1000):
            v = AdapterVersion(version=version, **record)
            if self.storage.create(_record_key(tenant, name, version), v.to_json()):
                with self._lock:
                    self._records[(tenant, name, version)] = v
                    self._names.pop((tenant, name), None)
                return v
            version += 1  # another writer took it: the next one
        raise errors.Unavailable(f"could not allocate a version of {tenant}/{name}: too many concurrent pushes")

    # ---- read -----------------------------------------------------------------------------

    def _name_state(self, tenant: str, name: str, *, fresh: bool = False) -> _NameState:
        key = (tenant, name)
        with self._lock:
            state = self._names.get(key)
            if state is not None and not fresh and time.monotonic() - state.at <= self.list_ttl_s:
                return state
        return self._scan(f"meta/{tenant}/{name}/").get(key) or _NameState([], {}, time.monotonic())

    def _scan(self, prefix: str) -> dict[tuple[str, str], _NameState]:
        """One listing of records and tombstones under `prefix` -> the state of each name."""
        now = time.monotonic()
        found: dict[tuple[str, str], tuple[set[int], dict[int, float]]] = {}
        for obj in self.storage.list(prefix):
            parts = obj.key.split("/")
            if len(parts) != 4:
                continue
            stem, _, suffix = parts[3].partition(".")
            if stem.isdigit() and suffix in ("json", "deleted"):
                versions, deleted = found.setdefault((parts[1], parts[2]), (set(), {}))
                if suffix == "json":
                    versions.add(int(stem))
                else:
                    deleted[int(stem)] = obj.mtime
        states = {
            k: _NameState(sorted(v), {n: t for n, t in d.items() if n in v}, now) for k, (v, d) in found.items()
        }
        with self._lock:
            self._names.update(states)
        return states

    def _record(self, tenant: str, name: str, version: int) -> AdapterVersion:
        key = (tenant, name, version)
        with self._lock:
            rec = self._records.get(key)
        if rec is None:
            data = self.storage.read(_record_key(tenant, name, version))
            try:
                rec = AdapterVersion.from_json(data)
            except (ValueError, TypeError, KeyError) as e:
                raise errors.DataLoss(f"the registry record of {tenant}/{name}@{version} is corrupt: {e}") from e
            with self._lock:
                self._records[key] = rec
        return rec

    def _visible(self, caller: str, rec: AdapterVersion) -> bool:
        return rec.tenant == caller or rec.visibility == "public"

    def resolve(self, tenant: str, ref: str) -> AdapterVersion:
        """"name", "name@3", "tenant/name@3" as seen by `tenant`: its own adapters, and other
        tenants' public ones. Anything else is NOT_FOUND, worded the same whether it is
        absent, private to someone else, or deleted, so names of others do not leak."""
        owner, name, version = rules.parse_ref(ref)
        owner = owner or tenant
        state = self._name_state(owner, name)
        if version is not None and version not in state.versions and self.list_ttl_s > 0:
            state = self._name_state(owner, name, fresh=True)  # pushed elsewhere a moment ago?
        candidates = [version] if version is not None else reversed(state.versions)
        for v in candidates:
            if v in state.versions and v not in state.deleted:
                rec = self._record(owner, name, v)
                if self._visible(tenant, rec):
                    return rec
        shown = ref if "/" in ref or owner == tenant else f"{owner}/{ref}"
        raise errors.NotFound(f"adapter {shown!r} not found (push it first, or check the name and version)")

    get = resolve

    def read_files(self, version: AdapterVersion) -> dict[str, bytes]:
        """The version's files, each checked against its recorded sha256."""
        out = {}
        for fname, entry in version.files.items():
            try:
                data = self.storage.read(blob_key(entry.sha256))
            except StorageMissing as e:
                if version.version in self._name_state(version.tenant, version.name, fresh=True).deleted:
                    raise errors.NotFound(f"adapter {version.full_ref} was deleted") from e
                raise errors.ChecksumMismatch(
                    f"adapter {version.full_ref}: stored file {fname} is missing from the registry; push it again"
                ) from e
            actual = hashlib.sha256(data).hexdigest()
            if actual != entry.sha256 or len(data) != entry.size:
                raise errors.ChecksumMismatch(
                    f"adapter {version.full_ref}: stored file {fname} is corrupt (sha256 {actual[:12]}..., "
                    f"recorded {entry.sha256[:12]}...); delete and push it again"
                )
            out[fname] = data
        return out

    def load(self, version: AdapterVersion) -> AdapterWeights:
        """Verified files -> checked AdapterWeights for the served base model."""
        self.check_servable(version)
        files = self.read_files(version)
        return load_adapter_files(
            files[rules.CONFIG_FILE], files[rules.WEIGHTS_FILE], self.spec, self.max_rank,
            name=version.ref, sha256=version.sha256,
        )

    def check_servable(self, version: AdapterVersion) -> None:
        """AdapterMismatch for a version pushed against another base model."""
        if self.spec is None:
            raise errors.FailedPrecondition("this registry has no base model to load adapters for")
        if version.base_identity and version.base_identity != self.spec.identity:
            raise errors.AdapterMismatch(
                f"adapter {version.full_ref} was pushed for base model {version.base_model!r} "
                f"({version.base_identity[:12]}...), this server serves {self.spec.name!r} "
                f"({self.spec.identity[:12]}...): push it again here"
            )

    def list(
        self,
        tenant: str,
        *,
        owner: str | None = None,
        name: str | None = None,
        name_prefix: str = "",
        all_versions: bool = False,
        source: str | None = None,
        visibility: str | None = None,
        page_size: int = 100,
        page_token: str = "",
    ) -> tuple[list[AdapterVersion], str]:
        """Adapters `tenant` can see, ordered by (tenant, name, version): the latest visible
        version of each name, or every version. Returns (page, next_page_token or "")."""
        if not 1 <= page_size <= 1000:
            raise errors.InvalidArgument(f"page_size must be in 1..1000; got {page_size}")
        after = _decode_token(page_token)
        if owner is not None:
            self._check_names(owner, "x")
        states = self._scan(f"meta/{owner}/" if owner else "meta/")
        out: list[AdapterVersion] = []
        for (t, n), state in sorted(states.items()):
            if (name and n != name) or not n.startswith(name_prefix):
                continue
            if after is not None and (t, n) < after[:2]:
                continue
            live = [self._record(t, n, v) for v in reversed(state.versions) if v not in state.deleted]
            live = [r for r in live if self._visible(tenant, r)
                    and (source is None or r.source == source) and (visibility is None or r.visibility == visibility)]
            for rec in live if all_versions else live[:1]:
                if after is not None and (rec.tenant, rec.name, -rec.version) <= after:
                    continue
                out.append(rec)
            if len(out) > page_size:
                break
        out.sort(key=lambda r: (r.tenant, r.name, -r.version))
        page, more = out[:page_size], len(out) > page_size
        return page, (_encode_token(page[-1]) if more else "")

    # ---- delete ---------------------------------------------------------------------------

    def delete(self, tenant: str, ref: str) -> list[AdapterVersion]:
        """Delete one version ("name@3") or every version ("name") of the caller's adapter.
        Requests already running on it keep their loaded weights and finish; new ones get
        NOT_FOUND. Returns the versions deleted."""
        owner, name, version = rules.parse_ref(ref)
        if owner is not None and owner != tenant:
            self.resolve(tenant, ref)  # NOT_FOUND unless visible
            raise errors.PermissionDenied(f"adapter {ref!r} belongs to tenant {owner!r}; only its owner can delete it")
        state = self._name_state(tenant, name, fresh=True)
        targets = [version] if version is not None else [v for v in state.versions if v not in state.deleted]
        if not targets or any(v not in state.versions or v in state.deleted for v in targets):
            raise errors.NotFound(f"adapter {ref!r} not found (push it first, or check the name and version)")
        deleted = []
        for v in targets:
            rec = self._record(tenant, name, v)
            self.storage.create(_record_key(tenant, name, v, "deleted"), json.dumps({"deleted_at": time.time()}).encode())
            deleted.append(rec)
        with self._lock:
            self._names.pop((tenant, name), None)
        self.collect_garbage()  # earlier deletions' files; these stay for deleted_grace_s
        if self.deleted_grace_s > 0:
            timer = threading.Timer(self.deleted_grace_s + self.storage.mtime_slack_s + 1, self._sweep_quietly)
            timer.daemon = True
            timer.start()
        log.info("deleted %s", ", ".join(r.full_ref for r in deleted))
        return deleted

    def _sweep_quietly(self) -> None:
        try:
            self.collect_garbage()
        except Exception:  # noqa: BLE001 - a background sweep must not kill anything; the next one retries
            log.exception("registry sweep failed")

    # ---- housekeeping ---------------------------------------------------------------------

    def collect_garbage(self) -> int:
        """Remove blobs that no live version and no live push refers to, and the notes of
        dead pushes. Locally the sweep excludes pushes (flock), so it is exact; on S3 a blob
        written after the sweep began is kept, as it may belong to a push in flight."""
        with self.storage.sweep_lock():
            return self._sweep()

    def _sweep(self) -> int:
        started = time.time()
        exact = self.storage.exclusive_sweeps
        live_pushes, orphans, dead_pushes = set(), set(), []
        for obj in self.storage.list("pending/"):
            try:
                note = json.loads(self.storage.read(obj.key))
            except (StorageMissing, ValueError):
                continue
            if self._push_is_dead(note, obj):
                dead_pushes.append(obj.key)
                orphans.update(note.get("blobs", []))
            else:
                live_pushes.update(note.get("blobs", []))
        referenced = set(live_pushes)
        for (t, n), state in self._scan("meta/").items():
            for v in state.versions:
                if v not in state.deleted or started - state.deleted[v] < self.deleted_grace_s:
                    referenced.update(e.sha256 for e in self._record(t, n, v).files.values())
        removed = 0
        for obj in self.storage.list("blobs/"):
            sha = obj.key.rsplit("/", 1)[-1]
            if sha not in referenced and (exact or sha in orphans or obj.mtime < started - self.storage.mtime_slack_s):
                self.storage.delete(obj.key)
                removed += 1
        for key in dead_pushes:
            self.storage.delete(key)
        return removed + len(dead_pushes)

    def _push_is_dead(self, note: dict, obj: ObjectInfo) -> bool:
        if note.get("failed") is True:
            return True
        if self.storage.exclusive_sweeps or time.time() - obj.mtime > self.stale_push_s:
            return True  # under the sweep lock, no push of this host is in flight
        same_host = note.get("host") == socket.gethostname() and isinstance(self.storage, LocalStorage)
        return same_host and not _pid_alive(int(note.get("pid", 0)))

    def clean_leftovers(self) -> int:
        """At start: what interrupted pushes left (temp files, unfinished uploads, blobs of
        pushes that never published). Never touches a published version."""
        removed = self.storage.clean_partial_writes(self.stale_push_s)
        removed += self.collect_garbage()
        if removed:
            log.info("registry %s: cleaned %d leftovers of interrupted pushes", self.storage.url, removed)
        return removed


def _file_entry(content: bytes | Path, sha256: str | None = None) -> FileEntry:
    """The record of one file; `sha256` when the caller hashed it already."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return FileEntry(sha256 or hashlib.sha256(content).hexdigest(), len(content))
    return FileEntry(sha256 or rules.sha256_file(content), os.path.getsize(content))


def _encode_token(rec: AdapterVersion) -> str:
    return base64.urlsafe_b64encode(json.dumps([rec.tenant, rec.name, rec.version]).encode()).decode()


def _decode_token(token: str):
    if not token:
        return None
    try:
        t, n, v = json.loads(base64.urlsafe_b64decode(token.encode()))
        return (str(t), str(n), -int(v))
    except (ValueError, TypeError, RecursionError) as e:
        raise errors.InvalidArgument("page_token is not one this server issued; start again without it") from e


def open_registry(config, *, max_rank: int | None, spec=None) -> Registry:
    """The Registry of a RegistryConfig (config.py). `spec` may come later (`registry.spec =`)
    once the base model is loaded; pushes wait for it."""
    s3 = S3Options(config.s3_endpoint, config.s3_region, config.s3_access_key_id, config.s3_secret)
    return Registry(
        open_storage(config.location, s3), spec=spec, max_rank=max_rank, max_bytes=config.max_adapter_bytes,
        max_virtual_tokens=config.max_virtual_tokens,
        list_ttl_s=config.list_ttl_s, deleted_grace_s=config.deleted_grace_s, require_spec=True,
    )


class RegistryResolver:
    """The cache's resolver (engine/adapters.py) on the registry: "name[@N]" -> the version's
    key "sha256:<digest>:<tenant>/<name>@<N>" and a loader that reads and verifies the files. Counts the
    requests for each version (ListAdapters shows them)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.requests: Counter[tuple[str, str, int]] = Counter()

    def resolve(self, tenant: str, ref: str):

        version = self.registry.resolve(tenant, ref)
        self.registry.check_servable(version)
        self.requests[(version.tenant, version.name, version.version)] += 1
        return ResolvedAdapter(
            key=cache_key(version),
            name=version.ref if version.tenant == tenant else version.full_ref,
            load=lambda spec, max_rank: self.registry.load(version),
        )

    def request_count(self, version: AdapterVersion) -> int:
        return self.requests[(version.tenant, version.name, version.version)]


def cache_key(version: AdapterVersion) -> str:
    """The cache's key of a version: its content and which version it is. Per version, not per
    content alone: two tenants may push the same bytes, and what the cache remembers of one
    (a failed load, and the error naming it) must never reach the other, nor outlive the
    version (a new push of the same bytes is a new key, loaded afresh)."""
    return f"sha256:{version.sha256}:{version.full_ref}"
