"""The Export service: an adapter merged into the base model, streamed as a model directory.

Thin: resolve the caller's reference in the registry (NOT_FOUND for what it may not see),
merge in a thread (export.py) into a temporary directory, then stream a header and the
files. One export runs at a time: merging holds a full-precision copy of the model's
weights in memory, so a second is RESOURCE_EXHAUSTED until the first is done.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from pathlib import Path

import adapterd_rules as rules
from adapterd_api.v1 import export_pb2 as pb
from adapterd_api.v1 import export_pb2_grpc as pb_grpc

from adapterd import errors, export
from adapterd.tenancy import current_principal

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Export"].full_name
CHUNK_BYTES = 1 << 20


class ExportService(pb_grpc.ExportServicer):
    def __init__(self, registry, base_model: Path):
        self.registry = registry
        self.base_model = Path(base_model)
        self._busy = asyncio.Lock()

    async def ExportMerged(self, request: pb.ExportMergedRequest, context):
        dtype = export.parse_dtype(request.dtype)
        version = await asyncio.to_thread(self.registry.resolve, current_principal().tenant, request.adapter)
        if self._busy.locked():
            raise errors.ResourceExhausted("another merged export is running on this server; try again when it is done")
        async with self._busy:
            files = await asyncio.to_thread(self.registry.read_files, version)
            out = Path(tempfile.mkdtemp(prefix="adapterd-export-"))
            try:
                model_dir = out / "model"
                await asyncio.to_thread(export.merge, self.base_model, files[rules.CONFIG_FILE],
                                        files[rules.WEIGHTS_FILE], model_dir, dtype=dtype)
                entries = await asyncio.to_thread(_entries, model_dir)
                yield pb.ExportMergedResponse(header=pb.ExportHeader(
                    adapter=version.ref, files=entries, total_bytes=sum(e.size for e in entries)))
                for entry in entries:
                    with open(model_dir / entry.path, "rb") as f:
                        while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                            yield pb.ExportMergedResponse(chunk=pb.ExportChunk(path=entry.path, data=chunk))
            finally:
                shutil.rmtree(out, ignore_errors=True)


def _entries(model_dir: Path) -> list[pb.ExportedFile]:
    entries = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        entries.append(pb.ExportedFile(path=path.relative_to(model_dir).as_posix(), size=path.stat().st_size,
                                       sha256=digest.hexdigest()))
    return entries


def register(server, registry, base_model: Path) -> str:
    pb_grpc.add_ExportServicer_to_server(ExportService(registry, base_model), server)
    return SERVICE_NAME
