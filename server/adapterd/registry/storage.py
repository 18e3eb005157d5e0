"""Where the registry's bytes live: a local directory, or S3-compatible object storage.

Both backends offer the same few operations on flat keys ("blobs/ab/ab12...",
"meta/default/sql/00000003.json"). Two of them carry the registry's guarantees:

    put(key, src)      replace atomically: readers see the old object or the whole new one
    create(key, data)  create only if absent, atomically: two replicas pushing the same
                       name can never both write version N (the loser takes N+1)

Local: a temp file in ROOT/.tmp, fsync, then rename (put) or hard link (create, which fails
if the target exists), then fsync of the directory. A crash leaves only temp files, named
with host and pid so the next start can tell a dead writer's leftovers from a live one's.
S3: PutObject (multipart for large files, through boto3's transfer manager) and
PutObject with If-None-Match: * for create; a crash leaves an unfinished multipart upload,
aborted at the next start once it is old enough.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterd import errors

_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TMP_DIR = ".tmp"


class StorageMissing(KeyError):
    """The key does not exist (the caller turns it into NOT_FOUND or DATA_LOSS)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


def check_key(key: str) -> str:
    """Keys are built from checked names, and checked again here: no '..', no absolute
    path, no NUL, nothing that could name a file outside the root."""
    parts = key.split("/")
    if not parts or not all(_KEY_PART.fullmatch(p) and ".." not in p for p in parts):
        raise errors.InvalidArgument(f"invalid registry key {key!r}")
    return key


class Storage(ABC):
    """Flat keys -> immutable bytes. Thread-safe; every call may block (S3: network)."""

    url: str
    # True when sweep_lock() excludes every push in progress (then a sweep is exact);
    # otherwise a sweep relies on pending notes and modification times.
    exclusive_sweeps = False
    mtime_slack_s = 0.0  # the resolution of ObjectInfo.mtime

    def push_lock(self) -> contextlib.AbstractContextManager:
        """Held (shared) for a whole push."""
        return contextlib.nullcontext()

    def sweep_lock(self) -> contextlib.AbstractContextManager:
        """Held (exclusive) while unreferenced blobs are removed."""
        return contextlib.nullcontext()

    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        """A private local directory for an upload in progress, removed afterwards."""
        return tempfile.TemporaryDirectory(prefix="adapterd-push-")

    @abstractmethod
    def put(self, key: str, src: Path | bytes) -> None:
        """Write atomically, replacing any object of that key."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write atomically if absent. False (and nothing written) when the key exists."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; StorageMissing if absent."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove if present."""

    @abstractmethod
    def clean_partial_writes(self, older_than_s: float) -> int:
        """Remove what interrupted writes left behind; returns how many."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except StorageMissing:
            return False
        return True

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and mtime; StorageMissing if absent."""


# ---- local directory ----------------------------------------------------------------------

# What the disk says -> what the caller can do about it. A full disk is RESOURCE_EXHAUSTED
# (delete adapters, or the operator adds space); a registry that refuses writes (permissions,
# an immutable file, a read-only file system) is FAILED_PRECONDITION: retrying cannot help
# until the operator fixes the registry.
_FULL = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is exhausted"}
_REFUSED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted (an immutable file?)",
            errno.EROFS: "the file system is read-only"}


def os_error(url: str, e: OSError, doing: str) -> errors.AdapterdError:
    """The typed error, naming the registry, for an OSError met while `doing` ("writing")."""
    if e.errno in _FULL:
        return errors.ResourceExhausted(f"adapter registry {url}: {_FULL[e.errno]} while {doing}; nothing was stored")
    if e.errno in _REFUSED:
        return errors.FailedPrecondition(
            f"adapter registry {url} refuses {doing}: {_REFUSED[e.errno]}; the server's operator must fix "
            "the registry's permissions or mount"
        )
    reason = os.strerror(e.errno) if e.errno else "I/O error"
    return errors.Unavailable(f"adapter registry {url}: {reason} while {doing}; retry later")


@contextlib.contextmanager
def os_errors(url: str, doing: str):
    """Any OSError in the block (but a missing file, which callers handle) -> os_error()."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        raise os_error(url, e, doing) from e



def _writer_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalStorage(Storage):
    exclusive_sweeps = True  # flock excludes every process on this host that uses the root

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = self.root.resolve()
        (self.root / TMP_DIR).mkdir(exist_ok=True)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # A symlink anywhere on the way (a planted link, a link to /etc) must not lead out.
        real = path.resolve()
        if not real.is_relative_to(self._real_root):
            raise errors.PermissionDenied(f"registry path {key!r} leads out of the registry root {self.root}")
        return path

    @contextlib.contextmanager
    def _flock(self, mode: int):
        fd = os.open(self.root / TMP_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, mode)  # released by the kernel if this process dies
            yield
        finally:
            os.close(fd)

    def push_lock(self):
        return self._flock(fcntl.LOCK_SH)

    def sweep_lock(self):
        return self._flock(fcntl.LOCK_EX)

    @contextlib.contextmanager
    def staging_dir(self):
        # Inside the root: nothing is written elsewhere, and a crash's leftovers are found
        # (and removed) by clean_partial_writes like any temp file. The upload's own writes
        # into it fail as the registry's writes do (a full disk, a read-only registry).
        path = Path(f"{self._tmp()}.d")
        with os_errors(self.url, "uploads"):
            path.mkdir()
        try:
            with os_errors(self.url, "uploads"):
                yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _tmp(self) -> Path:
        return self.root / TMP_DIR / f"{_writer_tag()}-{uuid.uuid4().hex}"

    def _write_tmp(self, src: Path | bytes) -> Path:
        tmp = self._tmp()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(src, (bytes, bytearray, memoryview)):
                    f.write(src)
                else:
                    with open(src, "rb") as s:
                        shutil.copyfileobj(s, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, key: str, src: Path | bytes) -> None:
        path = self._path(key)
        with os_errors(self.url, "writes"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_tmp(src)
            try:
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._fsync_dir(path.parent)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with os_errors(self.url, "writes"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_tmp(data)
            try:
                os.link(tmp, path)  # atomic, and fails if the target exists: rename would replace
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            self._fsync_dir(path.parent)
        return True

    def read(self, key: str) -> bytes:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as e:
            raise StorageMissing(key) from e
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise errors.PermissionDenied(f"registry file {key!r} is a symlink; refused") from e
            raise os_error(self.url, e, "reads") from e
        with os_errors(self.url, "reads"), os.fdopen(fd, "rb") as f:
            return f.read()

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key), follow_symlinks=False)
        except FileNotFoundError as e:
            raise StorageMissing(key) from e
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk the directory holding the prefix; never follow symlinks.
        base, _, _ = prefix.rpartition("/")
        start = self._path(base) if base else self.root
        if not start.is_dir():
            return
        found = []
        for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
            rel = os.path.relpath(dirpath, self.root)
            if rel == TMP_DIR or rel.startswith(TMP_DIR + os.sep):
                dirnames[:] = []
                continue
            for name in filenames:
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                if key.startswith(prefix):
                    st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with os_errors(self.url, "deletes"):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            self._fsync_dir(path.parent)

    def clean_partial_writes(self, older_than_s: float) -> int:
        """Temp files and upload directories of writers that died (same host, pid gone) or
        that are old."""
        host, removed, now = socket.gethostname(), 0, time.time()
        for tmp in (self.root / TMP_DIR).iterdir():
            if tmp.name == "lock":
                continue
            writer_host, _, rest = tmp.name.rpartition("-")[0].rpartition("-")
            dead = writer_host == host and rest.isdigit() and not _pid_alive(int(rest))
            try:
                old = now - tmp.lstat().st_mtime > older_than_s
            except FileNotFoundError:
                continue
            if dead or old:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
                removed += 1
        return removed


# ---- S3-compatible object storage ---------------------------------------------------------


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None  # None: AWS; else MinIO, Ceph, moto, ...
    region: str | None = None
    access_key_id: str | None = None  # None: the usual AWS variables, profiles, roles
    secret_access_key: str | None = None


class S3Storage(Storage):
    mtime_slack_s = 1.0  # LastModified has whole seconds

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None, client=None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        options = options or S3Options()
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self._client = client or boto3.client(
            "s3",
            endpoint_url=options.endpoint_url,
            region_name=options.region,
            aws_access_key_id=options.access_key_id,
            aws_secret_access_key=options.secret_access_key,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )
        self._transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20)

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextlib.contextmanager
    def _errors(self, key: str = ""):
        """botocore's exceptions -> StorageMissing for an absent key, UNAVAILABLE otherwise
        (the store is down, or misconfigured: the message says which)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageMissing(key) from e
            if code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise errors.FailedPrecondition(
                    f"adapter registry {self.url} refuses the server: {code}; the server's operator must fix "
                    "its credentials or the bucket's policy"
                ) from e
            raise errors.Unavailable(f"adapter registry {self.url}: {code or 'error'}: {e}") from e
        except (BotoCoreError, S3UploadFailedError) as e:
            raise errors.Unavailable(f"adapter registry {self.url}: {e}") from e

    def put(self, key: str, src: Path | bytes) -> None:
        with self._errors(key):
            if isinstance(src, (bytes, bytearray, memoryview)):
                self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=bytes(src))
            else:
                self._client.upload_file(str(src), self.bucket, self._k(key), Config=self._transfer)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return False
                raise
        return True

    def read(self, key: str) -> bytes:
        with self._errors(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()

    def stat(self, key: str) -> ObjectInfo:
        with self._errors(key):
            head = self._client.head_object(Bucket=self.bucket, Key=self._k(key))
        return ObjectInfo(key, head["ContentLength"], head["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found = []
        with self._errors():
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found.append(ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj["LastModified"].timestamp()))
        yield from found

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def clean_partial_writes(self, older_than_s: float) -> int:
        """Abort multipart uploads under the prefix begun more than `older_than_s` ago (they
        may belong to another replica's push in progress, hence the age)."""
        removed, now = 0, time.time()
        with self._errors():
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for up in page.get("Uploads", []):
                    if now - up["Initiated"].timestamp() > older_than_s:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                        removed += 1
        return removed


def open_storage(location: str | Path, s3: S3Options | None = None) -> Storage:
    """A directory path, or s3://bucket/prefix."""
    text = str(location)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise errors.InvalidArgument(f"--registry {text}: no bucket; use s3://bucket/prefix")
        return S3Storage(bucket, prefix, s3)
    if "://" in text:
        raise errors.InvalidArgument(f"--registry {text}: use a directory or s3://bucket/prefix")
    return LocalStorage(Path(text))
