"""The Adapters service: push, list, get and delete adapters in the registry.

Thin: take the request, call the Registry (in a thread: S3 calls block), answer. A push
streams into a private staging directory (inside a local registry's root), bounded by
--max-adapter-bytes as the bytes arrive; the registry then checks the files and publishes
them as the next version.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

from adapterctl import adapter_check as check
from adapterd_api.v1 import adapters_pb2 as pb
from adapterd_api.v1 import adapters_pb2_grpc as pb_grpc

from adapterd import errors
from adapterd.registry.store import (
    AdapterVersion,
    Registry,
    RegistryResolver,
    cache_key,
)
from adapterd.registry.validate import require_adapter_files
from adapterd.tenancy import current_principal

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Adapters"].full_name

VISIBILITY = {"private": pb.VISIBILITY_PRIVATE, "public": pb.VISIBILITY_PUBLIC}
SOURCE = {"pushed": pb.SOURCE_PUSHED, "trained": pb.SOURCE_TRAINED}
RESIDENCE = {"gpu": pb.RESIDENCE_GPU, "cpu": pb.RESIDENCE_CPU, "storage": pb.RESIDENCE_STORAGE}
_VISIBILITY_NAMES = {v: k for k, v in VISIBILITY.items()}
_SOURCE_NAMES = {v: k for k, v in SOURCE.items()}

# residence(cache key) -> "gpu" | "cpu" | "storage"
Residence = Callable[[str], str]


class AdaptersService(pb_grpc.AdaptersServicer):
    def __init__(self, registry: Registry, resolver: RegistryResolver | None = None,
                 residence: Residence = lambda key: "storage"):
        self.registry = registry
        self.resolver = resolver
        self.residence = residence

    async def PushAdapter(self, request_iterator, context) -> pb.Adapter:
        principal = current_principal()
        if not principal.can_write():
            raise errors.PermissionDenied(f"role {principal.role!r} cannot push adapters")
        with self.registry.storage.staging_dir() as spool:
            header, files = await receive_push(request_iterator, Path(spool), self.registry.max_bytes)
            version = await asyncio.to_thread(
                self.registry.push, principal.tenant, header.name, files,
                description=header.description,
                visibility="public" if header.visibility == pb.VISIBILITY_PUBLIC else "private",
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
            source=_SOURCE_NAMES.get(request.source),
            visibility=_VISIBILITY_NAMES.get(request.visibility),
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
        return pb.DeleteAdapterResponse(deleted=[self._adapter(v) for v in deleted])

    async def GetPushRules(self, request: pb.GetPushRulesRequest, context) -> pb.PushRules:
        spec = self.registry.spec
        rules = pb.PushRules(max_rank=self.registry.max_rank or 0, max_adapter_bytes=self.registry.max_bytes or 0)
        if spec is not None:
            rules.base_model, rules.base_model_identity = spec.name, spec.identity
            for path, (in_f, out_f) in spec.linear_shapes.items():
                rules.linear_shapes[path].in_features = in_f
                rules.linear_shapes[path].out_features = out_f
        return rules

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
        metrics=v.metrics, residence=pb.RESIDENCE_STORAGE,
        files=[pb.AdapterFile(name=n, size=e.size, sha256=e.sha256) for n, e in sorted(v.files.items())],
    )
    msg.created_at.FromNanoseconds(int(v.created_at * 1e9))
    return msg


async def receive_push(request_iterator, spool: Path, max_bytes: int | None) -> tuple[pb.PushHeader, dict[str, Path]]:
    """Read the header, then each file's bytes into `spool`, refusing as early as possible:
    a pickled or unknown file name and a declared total above the cap before any byte, more
    bytes than declared as they arrive."""
    first = await anext(aiter(request_iterator), None)
    if first is None or first.WhichOneof("part") != "header":
        raise errors.InvalidArgument("PushAdapter: the first message must be the header (name and files)")
    header = first.header
    check_push_header(header, max_bytes)
    files = {f.name: spool / f.name for f in header.files}
    index, written, out = 0, 0, None
    hashes = [hashlib.sha256() for _ in header.files]
    try:
        out = open(files[header.files[0].name], "wb")  # noqa: SIM115 - rotated across files below
        async for msg in request_iterator:
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
                out.write(data[:take])
                hashes[index].update(data[:take])
                written += take
                data = data[take:]
    finally:
        if out is not None:
            out.close()
    received = sum(f.size for f in header.files[:index]) + written
    declared = sum(f.size for f in header.files)
    if received != declared:
        raise errors.InvalidArgument(f"PushAdapter: the upload ended after {received} of {declared} declared bytes")
    for f, h in zip(header.files, hashes, strict=True):
        if f.sha256 and f.sha256.lower() != h.hexdigest():
            raise errors.InvalidArgument(f"PushAdapter: {f.name} arrived with another sha256 than declared; push again")
    for f in header.files:  # zero-length files were never opened
        files[f.name].touch()
    return header, files


def check_push_header(header: pb.PushHeader, max_bytes: int | None) -> None:
    try:
        check.check_name(header.name)
    except check.CheckError as e:
        raise errors.InvalidArgument(str(e)) from e
    names = [f.name for f in header.files]
    if len(set(names)) != len(names):
        raise errors.InvalidArgument(f"PushAdapter: a file is listed twice in {names}")
    require_adapter_files(set(names))  # on the wire: the two files and nothing else
    total = sum(f.size for f in header.files)
    if max_bytes is not None and total > max_bytes:
        raise errors.AdapterTooLarge(
            f"adapter is {total} bytes, above this server's limit of {max_bytes} (--max-adapter-bytes)"
        )


def register(server, registry: Registry, resolver: RegistryResolver | None = None,
             residence: Residence = lambda key: "storage") -> str:
    pb_grpc.add_AdaptersServicer_to_server(AdaptersService(registry, resolver, residence), server)
    return SERVICE_NAME
