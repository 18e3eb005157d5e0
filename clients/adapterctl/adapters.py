"""`adapterctl push | list | show | delete`: the adapter registry, and its client library.

    push DIR --name N [--description D] [--public]   check locally, then upload -> name@N+1
    list [--json] [--all-versions] [--name N]        a table of the adapters you can see
    show NAME[@V] [--json]                           one version in full
    delete NAME[@V]                                  one version, or every version of NAME

`push` checks the adapter with the server's own rules (adapterd_rules, against the base
model's layers from GetPushRules) before sending a byte, so a mistake shows at once; the
server checks again. Library use:

    with Client(addr) as c:
        AdaptersClient(c).push(Path("out/my-lora"), "my-lora")
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import adapterd_rules
import grpc
from adapterd_api.v1 import adapters_pb2 as pb
from adapterd_api.v1 import adapters_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from adapterctl.client import Client
from adapterctl.progress import Progress, size
from adapterctl.terminal import json_line, safe

CHUNK_BYTES = 1 << 20
PROGRESS_FROM_BYTES = 8 << 20  # a progress bar for files this large


def check_code(e: adapterd_rules.AdapterdError) -> grpc.StatusCode:
    """The status the server would answer a failed check with: a local one exits as the
    server's answer would, 10 + the status code number."""
    return grpc.StatusCode[e.code]


# ---- library ------------------------------------------------------------------------------


def adapter_files(directory: Path) -> list[tuple[str, Path]]:
    """The two files of a PEFT adapter directory; refuses a pickled .bin and links out."""
    _, weights = adapterd_rules.read_adapter_dir(Path(directory))
    config = adapterd_rules.CONFIG_FILE
    return [(config, Path(directory) / config), (adapterd_rules.WEIGHTS_FILE, weights)]


def check_locally(directory: Path, rules: pb.PushRules | None = None) -> adapterd_rules.CheckedAdapter:
    """The server's checks, here. With `rules` also rank, size and fit to the base model."""
    config_bytes, weights = adapterd_rules.read_adapter_dir(Path(directory))
    if rules is None:
        return adapterd_rules.check_adapter(config_bytes, weights)
    shapes = {p: (s.in_features, s.out_features) for p, s in rules.linear_shapes.items()} or None
    prompt = None
    if rules.hidden_size:  # a server that says what prompt and prefix tuning must fit
        prompt = adapterd_rules.PromptShape(rules.hidden_size, rules.num_layers, rules.kv_heads, rules.head_dim,
                                            rules.prefix_tuning)
    return adapterd_rules.check_adapter(
        config_bytes, weights, linear_shapes=shapes, prompt_shape=prompt,
        max_rank=rules.max_rank or None, max_bytes=rules.max_adapter_bytes or None,
        max_virtual_tokens=rules.max_virtual_tokens or None,
    )


def push_requests(
    files: list[tuple[str, Path]],
    name: str,
    *,
    description: str = "",
    public: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Iterator[pb.PushAdapterRequest]:
    """The PushAdapter stream: the header (names, sizes, sha256s), then every file's bytes."""
    infos = [pb.FileInfo(name=n, size=p.stat().st_size, sha256=adapterd_rules.sha256_file(p)) for n, p in files]
    yield pb.PushAdapterRequest(header=pb.PushHeader(
        name=name, description=description, files=infos,
        visibility=pb.VISIBILITY_PUBLIC if public else pb.VISIBILITY_PRIVATE,
    ))
    for _, path in files:
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                yield pb.PushAdapterRequest(chunk=pb.FileChunk(data=block))
                if progress is not None:
                    progress(len(block))


class AdaptersClient:
    """The Adapters RPCs over a Client's channel, with its metadata and timeout."""

    def __init__(self, client: Client):
        self.client = client
        self.stub = pb_grpc.AdaptersStub(client.channel)

    def _kw(self) -> dict:
        return {"metadata": self.client.metadata, "timeout": self.client.timeout}

    def rules(self) -> pb.PushRules:
        return self.stub.GetPushRules(pb.GetPushRulesRequest(), **self._kw())

    def push(self, directory: Path, name: str, *, description: str = "", public: bool = False,
             check_first: bool = True, progress: Callable[[int], None] | None = None) -> pb.Adapter:
        """Check (unless check_first=False), then upload. Raises adapterd_rules.AdapterdError or grpc.RpcError."""
        adapterd_rules.check_name(name)
        if check_first:
            check_locally(directory, self.rules())
        requests = push_requests(adapter_files(directory), name, description=description, public=public,
                                 progress=progress)
        return self.stub.PushAdapter(requests, **self._kw())

    def list(self, **filters) -> Iterator[pb.Adapter]:
        """Every adapter matching the ListAdaptersRequest fields in `filters`, page by page."""
        token = ""
        while True:
            page = self.stub.ListAdapters(pb.ListAdaptersRequest(page_token=token, **filters), **self._kw())
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def get(self, ref: str) -> pb.Adapter:
        return self.stub.GetAdapter(pb.GetAdapterRequest(adapter=ref), **self._kw())

    def delete(self, ref: str) -> list[pb.Adapter]:
        return list(self.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter=ref), **self._kw()).deleted)


# ---- commands -----------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="push a PEFT adapter directory as the next version of NAME",
        description="Check DIR (adapter_config.json + adapter_model.safetensors) with the server's rules, "
        "then upload it as NAME@N+1. A pickled adapter_model.bin is refused: save with "
        "safe_serialization=True.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--name", required=True, help=adapterd_rules.NAME_PATTERN)
    p.add_argument("--description", default="", help="a line about what the adapter does")
    p.add_argument("--public", action="store_true", help="let every tenant use it (default: yours only)")
    p.add_argument("--no-check", action="store_true", help="skip the local check (the server checks anyway)")
    p.add_argument("--json", action="store_true", help="print the new version as JSON")
    p.set_defaults(run=run_push)

    p = subparsers.add_parser("list", help="list the adapters you can see",
                              description="Your adapters and other tenants' public ones, latest version of each.")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--all-versions", action="store_true", help="every live version, not only the latest")
    p.add_argument("--name", default="", help="only this name")
    p.add_argument("--tenant", default="", help="only this tenant's adapters")
    p.set_defaults(run=run_list)

    p = subparsers.add_parser("show", help="show one adapter version in full")
    p.add_argument("ref", metavar="NAME[@V]", help='"name" (latest), "name@3" or "tenant/name@3"')
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_show)

    p = subparsers.add_parser(
        "delete", help="delete one version (NAME@V) or every version (NAME)",
        description="Requests already running on it finish; new ones get NOT_FOUND. Numbers are not reused.",
    )
    p.add_argument("ref", metavar="NAME[@V]")
    p.set_defaults(run=run_delete)


def run_push(args: argparse.Namespace) -> int:
    try:
        with Client.from_args(args) as client:
            ctl = AdaptersClient(client)
            adapterd_rules.check_name(args.name)
            files = adapter_files(args.dir)
            if not args.no_check:
                check_locally(args.dir, ctl.rules())
            total = sum(p.stat().st_size for _, p in files)
            bar = UploadBar(sys.stderr, total) if total >= PROGRESS_FROM_BYTES else None
            requests = push_requests(files, args.name, description=args.description, public=args.public,
                                     progress=bar.advance if bar else None)
            adapter = ctl.stub.PushAdapter(requests, **ctl._kw())
            if bar:
                bar.close()
    except adapterd_rules.AdapterdError as e:
        code = check_code(e)
        print(f"adapterctl: {code.name}: {safe(e)} (checked locally; nothing was uploaded)", file=sys.stderr)
        return 10 + code.value[0]
    if args.json:
        print(_json(adapter))
    else:
        print(f"pushed {safe(adapter.ref)} (sha256 {safe(adapter.sha256[:12])}, {size(adapter.size_bytes)}, "
              f"{_kind(adapter)})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        adapters = list(AdaptersClient(client).list(name=args.name, tenant=args.tenant, all_versions=args.all_versions))
    if args.json:
        for a in adapters:
            print(_json(a))
        return 0
    print(table(adapters))
    return 0


def run_show(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        adapter = AdaptersClient(client).get(args.ref)
    if args.json:
        print(_json(adapter))
        return 0
    d = _dict(adapter)
    width = max(len(k) for k in d)
    for key, value in d.items():
        if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
            shown = ", ".join(map(str, value))
        elif isinstance(value, (dict, list)):
            shown = json.dumps(value)
        elif key in ("visibility", "source", "residence"):
            shown = str(value).removeprefix(key.upper() + "_").lower()
        else:
            shown = str(value)
        print(f"{safe(key):<{width}}  {safe(shown) or '-'}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        deleted = AdaptersClient(client).delete(args.ref)
    for a in deleted:
        print(f"deleted {safe(a.ref)}")
    return 0


# ---- output -------------------------------------------------------------------------------

COLUMNS = ("NAME", "VERSION", "TENANT", "KIND", "RANK", "SIZE", "WHERE", "REQUESTS", "SOURCE", "VISIBILITY", "CREATED",
           "DESCRIPTION")


def table(adapters: list[pb.Adapter]) -> str:
    rows = [COLUMNS] + [tuple(safe(cell) for cell in (
        a.name, str(a.version), a.tenant, a.kind or "lora", str(a.rank) if a.rank else "-", size(a.size_bytes),
        _enum_name(pb.Residence, a.residence, "RESIDENCE_"), str(a.request_count),
        _enum_name(pb.Source, a.source, "SOURCE_") + (f" ({a.job_id})" if a.job_id else ""),
        _enum_name(pb.Visibility, a.visibility, "VISIBILITY_"),
        time.strftime("%Y-%m-%d %H:%M", time.localtime(a.created_at.seconds)),
        a.description if len(a.description) <= 40 else a.description[:39] + "…",
    )) for a in adapters]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _enum_name(enum, value: int, prefix: str) -> str:
    """"gpu" for RESIDENCE_GPU; the number for a value this client does not know (a newer
    server), instead of failing the whole listing."""
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _kind(a: pb.Adapter) -> str:
    """"lora, rank 8"; "prompt_tuning, 20 virtual tokens"; "ia3"."""
    kind = a.kind or "lora"  # a server from before other kinds were served
    if a.rank:
        return f"{kind}, rank {a.rank}"
    if a.virtual_tokens:
        return f"{kind}, {a.virtual_tokens} virtual tokens"
    return kind


def _dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _json(message) -> str:
    return json_line(_dict(message))


class UploadBar(Progress):
    """sent 12.0 MiB/28.5 MiB [##########..............]  42% 3.1 MiB/s"""

    MIN_REDRAW_S = 0.1  # advance() comes once a chunk

    def __init__(self, out, total: int):
        super().__init__(out)
        self.total, self.sent = max(total, 1), 0

    def advance(self, n: int) -> None:
        self.sent += n
        rate = self.sent / max(self.elapsed(), 1e-6)
        self.show(self.sent / self.total, f"sent {size(self.sent)}/{size(self.total)}", f"{size(rate)}/s")
