"""`adapterctl export NAME[@V] --merged DIR`: the adapter merged into the base model.

The server merges (it has the base model's full-precision weights) and streams the model
directory; this writes it into DIR with a progress bar, checking each file's size and
sha256, and moves it into place only once every file is complete: DIR then loads with
plain transformers, no adapter and no adapterd:

    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)

Library use: `export_merged(client, "sql@2", Path("sql-merged"))`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from adapterd_api.v1 import export_pb2 as pb
from adapterd_api.v1 import export_pb2_grpc as pb_grpc

from adapterctl.client import Client
from adapterctl.progress import Progress
from adapterctl.terminal import safe

DTYPES = ("float32", "bfloat16", "float16")


class ExportError(Exception):
    """The stream broke the contract (a path outside the directory, a wrong size or sha256)."""


def export_merged(client: Client, adapter: str, out_dir: Path, *, dtype: str = "float32",
                  on_progress: Callable[[int, int], None] = lambda done, total: None) -> pb.ExportHeader:
    """Write the merged model into `out_dir` (which must not exist); returns the header
    (the resolved adapter, the files). `on_progress(bytes_done, bytes_total)`."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; give a new directory")
    stub = pb_grpc.ExportStub(client.channel)
    # The merge takes a while before the first byte: no deadline on the stream.
    stream = stub.ExportMerged(pb.ExportMergedRequest(adapter=adapter, dtype=dtype), metadata=client.metadata)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        header = _receive(stream, partial, on_progress)
        partial.rename(out_dir)
    except BaseException:
        stream.cancel()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return header


def _receive(stream, into: Path, on_progress) -> pb.ExportHeader:
    first = next(stream, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise ExportError("the server's export stream did not start with its header")
    header = first.header
    expected = {f.path: f for f in header.files}
    for path in expected:
        p = PurePosixPath(path)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise ExportError(f"the server sent a file path outside the model directory: {path!r}")
    written: dict[str, int] = {}
    digests: dict[str, hashlib._Hash] = {}
    done, current, handle = 0, None, None
    try:
        for message in stream:
            chunk = message.chunk
            if chunk.path not in expected:
                raise ExportError(f"the server sent {chunk.path!r}, which its header does not list")
            if chunk.path != current:
                if handle is not None:
                    handle.close()
                current = chunk.path
                target = into / chunk.path
                target.parent.mkdir(parents=True, exist_ok=True)
                handle = open(target, "ab")  # noqa: SIM115 - closed when the next file starts, or below
                digests.setdefault(chunk.path, hashlib.sha256())
            handle.write(chunk.data)
            digests[chunk.path].update(chunk.data)
            written[chunk.path] = written.get(chunk.path, 0) + len(chunk.data)
            done += len(chunk.data)
            on_progress(done, header.total_bytes)
    finally:
        if handle is not None:
            handle.close()
    for path, f in expected.items():
        if written.get(path, 0) != f.size or (f.size and digests[path].hexdigest() != f.sha256):
            raise ExportError(f"{path}: received {written.get(path, 0)} bytes, expected {f.size} with sha256 "
                              f"{f.sha256[:12]}...; the export was cut short, run it again")
        if f.size == 0:
            (into / path).touch()
    return header


# ---- the command line ----------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write an adapter merged into the base model, as a standalone model directory",
        description="The server merges NAME[@VERSION] into its base model's full-precision weights and streams "
        "the result: merged safetensors, the config, tokenizer and chat template. DIR then loads with plain "
        "transformers (AutoModelForCausalLM.from_pretrained(DIR)), with no adapter and no adapterd.",
    )
    p.add_argument("adapter", metavar="NAME[@VERSION]", help='"name", "name@3" or "tenant/name@3"')
    p.add_argument("--merged", type=Path, required=True, metavar="DIR",
                   help="the new model directory to write (must not exist)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the merged weights' dtype (default: %(default)s, full precision)")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    if args.merged.exists():
        print(f"adapterctl: --merged {args.merged}: exists; give a new directory", file=sys.stderr)
        return 2
    bar = ByteBar(sys.stderr)
    with Client.from_args(args) as client:
        bar.note(f"merging {safe(args.adapter)} into the base model on the server...")
        header = export_merged(client, args.adapter, args.merged, dtype=args.dtype, on_progress=bar.update)
    bar.close()
    print(f"wrote {safe(header.adapter)} merged into the base model to {args.merged} "
          f"({len(header.files)} files, {header.total_bytes / 2**20:.1f} MiB)")
    return 0


class ByteBar(Progress):
    """received 120.5/513.2 MiB [######..................] 23% 41.2 MiB/s"""

    def update(self, done: int, total: int) -> None:
        rate = done / max(self.elapsed(), 1e-9)
        self.show(done / total if total else 1.0, f"received {done / 2**20:.1f}/{total / 2**20:.1f} MiB",
                  f"{rate / 2**20:.1f} MiB/s")
