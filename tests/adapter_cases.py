"""Bad adapters, one per failure a push must refuse, with the exact error and status code.
Shared by the registry unit tests and the gRPC tests (same cases, both backends)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import adapterd_rules as check
from adapterd import errors


def _write_adapter(src: Path, dst: Path, config_changes=None, weights: bytes | None = None) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / check.CONFIG_FILE).read_text())
        cfg.update(config_changes)
        (dst / check.CONFIG_FILE).write_text(json.dumps(cfg))
    if weights is not None:
        (dst / check.WEIGHTS_FILE).write_bytes(weights)
    return dst


BAD_PUSHES = [
    # (case, error class, gRPC code, message fragment)
    ("dora", errors.InvalidAdapter, "INVALID_ARGUMENT", "no DoRA magnitude vector"),
    ("rank", errors.UnsupportedAdapter, "INVALID_ARGUMENT", "max rank 2"),
    ("not_json", errors.InvalidAdapter, "INVALID_ARGUMENT", "not valid JSON"),
    ("not_lora", errors.UnsupportedAdapter, "INVALID_ARGUMENT", "'LOHA' is not supported"),
    ("truncated", errors.CorruptSafetensors, "INVALID_ARGUMENT", "truncated"),
    ("huge_header", errors.CorruptSafetensors, "INVALID_ARGUMENT", "limit"),
    ("pickled", errors.PickledWeights, "INVALID_ARGUMENT", "safe_serialization=True"),
    ("unknown_module", errors.UnknownTargetModule, "INVALID_ARGUMENT", "self_attn.x_proj"),
    ("other_base", errors.AdapterMismatch, "FAILED_PRECONDITION", "trained for another base model"),
    ("too_big", errors.AdapterTooLarge, "RESOURCE_EXHAUSTED", "--max-adapter-bytes"),
]


def bad_adapter(case: str, good: Path, tmp: Path, falcon: Path | None) -> Path:
    """A directory for `case`, made from the good adapter dir `good`. "other_base" is the
    Falcon adapter `falcon`; "rank" and "too_big" are good adapters, refused by a server
    with max rank 2 or max bytes 1000."""
    d = tmp / case
    blob = (good / check.WEIGHTS_FILE).read_bytes()
    if case == "dora":
        return _write_adapter(good, d, {"use_dora": True})
    if case == "rank":
        return _write_adapter(good, d)
    if case == "not_json":
        _write_adapter(good, d)
        (d / check.CONFIG_FILE).write_text("{,")
        return d
    if case == "not_lora":
        return _write_adapter(good, d, {"peft_type": "LOHA"})
    if case == "truncated":
        return _write_adapter(good, d, weights=blob[: len(blob) // 2])
    if case == "huge_header":
        return _write_adapter(good, d, weights=(10**12).to_bytes(8, "little") + blob[8:])
    if case == "pickled":
        _write_adapter(good, d)
        (d / check.WEIGHTS_FILE).rename(d / "adapter_model.bin")
        return d
    if case == "unknown_module":
        return _write_adapter(good, d, weights=blob.replace(b"self_attn.q_proj", b"self_attn.x_proj"))
    if case == "other_base":
        return falcon
    if case == "too_big":
        return _write_adapter(good, d, weights=None)
    raise AssertionError(case)
