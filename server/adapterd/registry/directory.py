"""Adapters served from a directory, without a registry: NAME is the PEFT directory ROOT/NAME."""

from __future__ import annotations

import re
from pathlib import Path

from adapterctl.adapter_check import quote

from adapterd import errors
from adapterd.resolve import ResolvedAdapter

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class DirectoryResolver:
    """Without a registry: an adapter NAME is the PEFT directory ROOT/NAME, checked when it is
    first loaded (`adapterd serve` resolves through the registry; tests use this one)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def resolve(self, tenant: str, ref: str) -> ResolvedAdapter:
        owner, _, rest = ref.rpartition("/")
        name, _, version = rest.partition("@")
        if owner and owner != tenant:
            raise errors.NotFound(f"adapter {quote(ref)} not found")
        if not NAME_RE.fullmatch(name):
            raise errors.InvalidArgument(
                f"adapter {quote(ref)}: a name is 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
            )
        if version:
            raise errors.NotFound(f"adapter {quote(ref)} not found: this server serves adapters by name only (no versions)")
        path = self.root / name
        config = path / "adapter_config.json"
        try:
            identity = [_stat_identity(config)]
        except FileNotFoundError:
            raise errors.NotFound(f"adapter {name!r} not found (no {config})") from None
        try:
            identity.append(_stat_identity(path / "adapter_model.safetensors"))
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
