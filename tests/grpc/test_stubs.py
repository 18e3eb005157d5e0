"""The committed Python stubs are exactly what `make proto` generates from protos/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date(tmp_path):
    plugins = {name: Path(sys.executable).parent / f"protoc-gen-{name}" for name in ("mypy", "mypy_grpc")}
    if not all(p.exists() for p in plugins.values()):
        plugins = {name: shutil.which(f"protoc-gen-{name}") for name in plugins}
    if not all(plugins.values()):
        pytest.skip("mypy-protobuf plugins not installed (the dev extra)")
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    assert protos
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}",
         *(f"--plugin=protoc-gen-{name}={path}" for name, path in plugins.items()),
         f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
         *(str(p.relative_to(ROOT)) for p in protos)],
        cwd=ROOT, check=True, capture_output=True,
    )
    generated = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed_dir = ROOT / "clients"
    stale = [str(rel) for rel, data in generated.items()
             if not (committed_dir / rel).exists() or (committed_dir / rel).read_bytes() != data]
    assert not stale, f"stubs out of date, run `make proto` and commit: {stale}"
    # No stub left behind for a proto that is gone.
    leftovers = [str(p.relative_to(committed_dir)) for p in (committed_dir / "adapterd_api").rglob("*_pb2*.py*")
                 if p.relative_to(committed_dir) not in generated]
    assert not leftovers, f"stubs without a proto: {leftovers}"
