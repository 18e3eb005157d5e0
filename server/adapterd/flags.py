"""Dataclass fields that are command-line flags: each setting written once.

    port: int = flag("--port", 50051, "port to listen on (default: %(default)s)")

A field made with `flag(...)` carries its flag's name and help in its metadata (as PEFT's
config fields carry their help); `Flags.add_flags` declares the flags of a dataclass from its
fields, and `Flags.from_args` builds the dataclass back from the parsed flags. Defaults, help
and the field are one line of code: they cannot drift apart. config.py uses it.
"""

from __future__ import annotations

import argparse
from dataclasses import Field, field, fields
from pathlib import Path
from typing import Any


def flag(name: str, default: Any, help: str, **argparse_kw: Any) -> Any:
    """A dataclass field set by the flag `name` of `adapterd serve`, with `default` and the
    flag's `help`; `argparse_kw` is what else argparse needs (metavar, choices, a `type` the
    default does not show). A bool is a switch: "--x" turns a False default on, "--no-x"
    turns a True default off."""
    return field(default=default, metadata={"flag": name, "help": help, "argparse": argparse_kw})


def _flagged(cls) -> list[Field]:
    return [f for f in fields(cls) if "flag" in f.metadata]


def _dest(f: Field) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def _switch_off(f: Field) -> bool:
    """A --no-x flag: given, the field (True by default) is False."""
    return f.default is True


class Flags:
    """A concern's dataclass whose fields are flags (`flag(...)`): declared and read back here."""

    @classmethod
    def add_flags(cls, group: argparse._ArgumentGroup) -> None:
        for f in _flagged(cls):
            kw = dict(f.metadata["argparse"])
            if isinstance(f.default, bool):
                kw["action"] = "store_true"
            else:
                kw["default"] = f.default
                if "type" not in kw and isinstance(f.default, (int, float, Path)):
                    kw["type"] = Path if isinstance(f.default, Path) else type(f.default)
            group.add_argument(f.metadata["flag"], help=f.metadata["help"], **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        values = {f.name: getattr(args, _dest(f)) for f in _flagged(cls)}
        for f in _flagged(cls):
            if _switch_off(f):
                values[f.name] = not values[f.name]
        return cls(**values)
