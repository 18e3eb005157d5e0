"""The Adapters service: push, list, get and delete adapters in the registry.

Thin: take the request, call the Registry (in a thread: S3 calls block), answer. A push
streams into a private staging directory (inside a local registry's root), bounded by
--max-adapter-bytes as the bytes arrive and by the upload limits (uploads.py: places per
tenant and in all, an idle timeout); the registry then checks the files and publishes
them as the next version. What can be refused early is: the header before any byte, the
config and the safetensors header as soon as their bytes are in, so a 600 MB upload with
a broken header is refused at its first bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import adapterd_rules as rules
from adapterd_api.v1 import adapters_pb2 as pb
from adapterd_api.v1 import adapters_pb2_grpc as pb_grpc

from adapterd import errors
from adapterd.registry.store import (
    AdapterVersion,
    Registry,
    RegistryResolver,
    cache_key,
)
from adapterd.tenancy import current_principal
from adapterd.uploads import Uploads

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Adapters"].full_name

VISIBILITY = {"private": pb.VISIBILITY_PRIVATE, "public": pb.VISIBILITY_PUBLIC}
SOURCE = {"pushed": pb.SOURCE_PUSHED, "trained": pb.SOURCE_TRAINED}
RESIDENCE = {"device": pb.RESIDENCE_GPU, "cpu": pb.RESIDENCE_CPU, "storage": pb.RESIDENCE_STORAGE}
_VISIBILITY_NAMES = {v: k for k, v in VISIBILITY.items()}
_SOURCE_NAMES = {v: k for k, v in SOURCE.items()}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

# residence(cache key) -> "device" | "cpu" | "storage" (engine/adapters.py)
Residence = Callable[[str], str]


class AdaptersService(pb_grpc.AdaptersServicer):
    def __init__(self, registry: Registry, resolver: RegistryResolver | None = None,
                 residence: Residence = lambda key: "storage", uploads: Uploads | None = None,
                 forget: Callable[[str], None] = lambda key: None):
        self.registry = registry
        self.resolver = resolver
        self.residence = residence
        self.uploads = uploads or Uploads()
        self.forget = forget  # forget(cache key): a deleted version's cached prefix blocks go

    async def PushAdapter(self, request_iterator, context) -> pb.Adapter:
        principal = current_principal()
        if not principal.can_write():
            raise errors.PermissionDenied(f"role {principal.role!r} cannot push adapters")
        with self.uploads.hold(principal.tenant, "PushAdapter"), self.registry.storage.staging_dir() as spool:
            messages = self.uploads.messages(request_iterator, "PushAdapter")
            header, files, sha256 = await receive_push(
                messages, Path(spool), self.registry.max_bytes, self.registry.max_rank,
                self.registry.max_virtual_tokens,
            )
            version = await asyncio.to_thread(
                self.registry.push, principal.tenant, header.name, files, sha256=sha256,
                description=header.description, visibility=_VISIBILITY_NAMES.get(header.visibility, "private"),
            )
        return self._adapter(version)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        tenant = current_principal().tenant
        page, token = await asyncio.to_thread(
            self.registry.list, tenant,
            owner=request.tenant or None,
            name=request.name or None,
            name_prefix=request.name_prefix,
            all_versions=request.all_versions,
            source=_enum_filter(request.source, _SOURCE_NAMES, pb.Source, "source"),
            visibility=_enum_filter(request.visibility, _VISIBILITY_NAMES, pb.Visibility, "visibility"),
            page_size=request.page_size or 100,
            page_token=request.page_token,
        )
        return pb.ListAdaptersResponse(adapters=[self._adapter(v) for v in page], next_page_token=token)

    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.Adapter:
        version = await asyncio.to_thread(self.registry.get, current_principal().tenant, request.adapter)
        return self._adapter(version)

    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context) -> pb.DeleteAdapterResponse:
        principal = current_principal()
        if not principal.can_write():
            raise errors.PermissionDenied(f"role {principal.role!r} cannot delete adapters")
        deleted = await asyncio.to_thread(self.registry.delete, principal.tenant, request.adapter)
        for v in deleted:
            self.forget(cache_key(v))
        return pb.DeleteAdapterResponse(deleted=[self._adapter(v) for v in deleted])

    async def GetPushRules(self, request: pb.GetPushRulesRequest, context) -> pb.PushRules:
        spec = self.registry.spec
        push_rules = pb.PushRules(max_rank=self.registry.max_rank or 0, max_adapter_bytes=self.registry.max_bytes or 0)
        if spec is not None:
            push_rules.base_model, push_rules.base_model_identity = spec.name, spec.identity
            for path, (in_f, out_f) in spec.linear_shapes.items():
                push_rules.linear_shapes[path].in_features = in_f
                push_rules.linear_shapes[path].out_features = out_f
            shape = spec.prompt_shape
            if shape is not None:
                push_rules.hidden_size, push_rules.num_layers = shape.hidden_size, shape.num_layers
                push_rules.kv_heads, push_rules.head_dim = shape.kv_heads, shape.head_dim
                push_rules.prefix_tuning = shape.prefix_tuning
        push_rules.max_virtual_tokens = self.registry.max_virtual_tokens or rules.DEFAULT_MAX_VIRTUAL_TOKENS
        return push_rules

    def _adapter(self, v: AdapterVersion) -> pb.Adapter:
        msg = adapter_message(v)
        msg.residence = RESIDENCE[self.residence(cache_key(v))]
        msg.request_count = self.resolver.request_count(v) if self.resolver is not None else 0
        return msg


def adapter_message(v: AdapterVersion) -> pb.Adapter:
    msg = pb.Adapter(
        name=v.name, tenant=v.tenant, version=v.version, ref=v.full_ref, sha256=v.sha256,
        size_bytes=v.size, rank=v.rank, alpha=v.alpha, scaling=v.scaling,
        target_modules=v.target_modules, base_model=v.base_model, base_model_identity=v.base_identity,
        trained_on=v.trained_on, description=v.description,
        visibility=VISIBILITY[v.visibility], source=SOURCE[v.source], job_id=v.job_id,
        metrics=v.metrics, residence=pb.RESIDENCE_STORAGE, kind=v.kind, virtual_tokens=v.virtual_tokens,
        files=[pb.AdapterFile(name=n, size=e.size, sha256=e.sha256) for n, e in sorted(v.files.items())],
    )
    msg.created_at.FromNanoseconds(int(v.created_at * 1e9))
    return msg


def _enum_filter(value: int, names: dict[int, str], enum, field: str) -> str | None:
    """A filter's enum value -> its name; UNSPECIFIED (0) -> None (no filter). A number the
    enum does not define is refused, never taken as "no filter"."""
    if value == 0:
        return None
    if value not in names:
        raise errors.InvalidArgument(
            f"{field} {value} is not one of {', '.join(enum.Name(v) for v in sorted(names))} (or 0: any)"
        )
    return names[value]


async def receive_push(messages, spool: Path, max_bytes: int | None, max_rank: int | None = None,
                       max_virtual_tokens: int | None = None) -> tuple[pb.PushHeader, dict[str, Path], dict[str, str]]:
    """Read the header, then each file's bytes into `spool`, refusing as early as possible:
    a bad header (a pickled or unknown file name, a declared total above the cap, a sha256
    that is not one) before any byte; adapter_config.json as soon as it is in; the
    safetensors header as soon as its bytes are (checked against the declared file size);
    more bytes than declared as they arrive. Returns the header, {file name: path} and
    {file name: sha256}, hashed as the bytes arrived, for the registry to record."""
    first = await anext(aiter(messages), None)
    if first is None or first.WhichOneof("part") != "header":
        raise errors.InvalidArgument("PushAdapter: the first message must be the header (name and files)")
    header = first.header
    check_push_header(header, max_bytes)
    files = {f.name: spool / f.name for f in header.files}
    early = {f.name: _EarlyCheck(f.name, f.size, max_rank, max_virtual_tokens) for f in header.files}
    index, written, out = 0, 0, None
    hashes = [hashlib.sha256() for _ in header.files]
    try:
        out = open(files[header.files[0].name], "wb")  # noqa: SIM115 - rotated across files below
        async for msg in messages:
            if msg.WhichOneof("part") != "chunk":
                raise errors.InvalidArgument("PushAdapter: only one header, at the start")
            data = msg.chunk.data
            while data:
                while index < len(header.files) and written == header.files[index].size:
                    out.close()
                    index, written = index + 1, 0
                    if index < len(header.files):
                        out = open(files[header.files[index].name], "wb")  # noqa: SIM115
                if index == len(header.files):
                    raise errors.InvalidArgument(
                        "PushAdapter: more bytes than the header declares; send the files' exact sizes"
                    )
                take = min(len(data), header.files[index].size - written)
                part = data[:take]
                early[header.files[index].name].feed(part)
                out.write(part)
                hashes[index].update(part)
                written += take
                data = data[take:]
    finally:
        if out is not None:
            out.close()
    received = sum(f.size for f in header.files[:index]) + written
    declared = sum(f.size for f in header.files)
    if received != declared:
        raise errors.InvalidArgument(f"PushAdapter: the upload ended after {received} of {declared} declared bytes")
    sha256 = {f.name: h.hexdigest() for f, h in zip(header.files, hashes, strict=True)}
    for f in header.files:
        if f.sha256 and f.sha256.lower() != sha256[f.name]:
            raise errors.InvalidArgument(f"PushAdapter: {f.name} arrived with another sha256 than declared; push again")
    for f in header.files:  # zero-length files were never opened
        files[f.name].touch()
    return header, files, sha256


class _EarlyCheck:
    """The checks one file's first bytes allow, as they arrive: the whole config once it is
    in (it is small), the safetensors header once its bytes are. Keeps only those bytes."""

    def __init__(self, name: str, size: int, max_rank: int | None, max_virtual_tokens: int | None = None):
        self.name, self.size, self.max_rank, self.max_virtual_tokens = name, size, max_rank, max_virtual_tokens
        self.start = bytearray()
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self.start += data
        if self.name == rules.CONFIG_FILE:
            if len(self.start) == self.size:
                rules.parse_config(bytes(self.start), max_rank=self.max_rank, max_virtual_tokens=self.max_virtual_tokens)
                self.done = True
        elif rules.check_safetensors_start(self.start, self.size) is not None:
            self.done = True
        if self.done:
            self.start = bytearray()


def check_push_header(header: pb.PushHeader, max_bytes: int | None) -> None:
    rules.check_name(header.name)
    rules.check_text(header.description, "description")
    if header.visibility not in _VISIBILITY_NAMES and header.visibility != pb.VISIBILITY_UNSPECIFIED:
        raise errors.InvalidArgument(
            f"visibility {header.visibility} is not one of VISIBILITY_PRIVATE (the default) or VISIBILITY_PUBLIC"
        )
    names = [f.name for f in header.files]
    if len(set(names)) != len(names):
        raise errors.InvalidArgument(f"PushAdapter: a file is listed twice in {rules.quote(names)}")
    rules.require_adapter_files(set(names))  # on the wire: the two files and nothing else
    for f in header.files:
        if f.sha256 and not _SHA256.fullmatch(f.sha256):
            raise errors.InvalidArgument(
                f"PushAdapter: the sha256 of {f.name} is {rules.quote(f.sha256)}, not 64 hex digits; "
                "send the file's sha256 in hex, or none"
            )
        if f.name == rules.CONFIG_FILE and f.size > rules.MAX_CONFIG_BYTES:
            raise errors.InvalidAdapter(f"{rules.CONFIG_FILE} is {f.size} bytes; a LoRA config is a few KiB")
    total = sum(f.size for f in header.files)
    if max_bytes is not None and total > max_bytes:
        raise errors.AdapterTooLarge(
            f"adapter is {total} bytes, above this server's limit of {max_bytes} (--max-adapter-bytes)"
        )


def register(server, registry: Registry, resolver: RegistryResolver | None = None,
             residence: Residence = lambda key: "storage", uploads: Uploads | None = None,
             forget: Callable[[str], None] = lambda key: None) -> str:
    pb_grpc.add_AdaptersServicer_to_server(AdaptersService(registry, resolver, residence, uploads, forget), server)
    return SERVICE_NAME
