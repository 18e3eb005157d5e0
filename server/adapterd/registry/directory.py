"""Adapters served from a directory, without a registry: NAME is the PEFT directory ROOT/NAME."""

from __future__ import annotations

from pathlib import Path

from adapterd_rules import CONFIG_FILE, WEIGHTS_FILE, parse_ref, quote

from adapterd import errors
from adapterd.resolve import ResolvedAdapter


class DirectoryResolver:
    """Without a registry: an adapter NAME is the PEFT directory ROOT/NAME, checked when it is
    first loaded (`adapterd serve` resolves through the registry; tests use this one)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def resolve(self, tenant: str, ref: str) -> ResolvedAdapter:
        owner, name, version = parse_ref(ref)
        if owner is not None and owner != tenant:
            raise errors.NotFound(f"adapter {quote(ref)} not found")
        if version is not None:
            raise errors.NotFound(f"adapter {quote(ref)} not found: this server serves adapters by name only (no versions)")
        path = self.root / name
        config = path / CONFIG_FILE
        try:
            identity = [_stat_identity(config)]
        except FileNotFoundError:
            raise errors.NotFound(f"adapter {name!r} not found (no {config})") from None
        try:
            identity.append(_stat_identity(path / WEIGHTS_FILE))
        except FileNotFoundError:
            identity.append("-")  # the load says what is missing
        return ResolvedAdapter(
            key=f"dir:{path.resolve()}:{':'.join(identity)}",
            name=name,
            load=lambda spec, max_rank: _read_adapter(path, spec, max_rank, name),
        )


def _stat_identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}.{st.st_mtime_ns}.{st.st_ino}"


def _read_adapter(path: Path, spec, max_rank: int, name: str):
    from adapterd.registry.validate import read_adapter

    return read_adapter(path, spec, max_rank, name=name)
