"""The engine's own C kernels, compiled on first use and loaded with ctypes:

    paged_attn.c  decode attention over the paged KV cache (attention.py)
    lora_flat.c   the LoRA delta of a decode-sized flat run, per token's adapter (lora.py)

One shared object holds both. It goes to the cache directory under a name derived from the
sources, the compiler, its flags and this CPU, so a changed kernel or another machine builds
anew, and a second start loads it at once. Compiling takes about a second; where there is
no C compiler (or the build fails) `load()` returns None with one log line, and each caller
falls back to its plain torch path: the same math, slower.

torch is imported first: its own libgomp is then already loaded, and the kernel's OpenMP
shares that runtime (one thread pool) instead of starting a second one.
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch  # loads torch's libgomp before ours (see above)

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("paged_attn.c", "lora_flat.c")]
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_PAGED_ARGS = [ct.c_void_p] * 7 + [ct.c_int64] * 6 + [ct.c_float]
_LORA_ARGS = [ct.c_void_p] * 2 + [ct.c_int64] * 3 + [ct.c_void_p] * 6 + [ct.c_int64, ct.c_void_p]


@dataclass(frozen=True)
class Kernels:
    paged_decode: ct._CFuncPtr  # paged_decode_f32
    lora_flat: dict[torch.dtype, ct._CFuncPtr]  # by the weights' dtype: float32, bfloat16


_loaded: dict[str, Kernels | None] = {}


def load(cache_dir: Path | None = None) -> Kernels | None:
    """The kernels as ctypes functions, or None where they cannot be built."""
    if "lib" in _loaded:
        return _loaded["lib"]
    kernels = None
    try:
        lib = ct.CDLL(str(_build(Path(cache_dir) if cache_dir else _default_cache())))
        for name, argtypes in (("paged_decode_f32", _PAGED_ARGS), ("lora_flat_f32", _LORA_ARGS),
                               ("lora_flat_bf16", _LORA_ARGS)):
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
        kernels = Kernels(lib.paged_decode_f32, {torch.float32: lib.lora_flat_f32, torch.bfloat16: lib.lora_flat_bf16})
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("the engine's C kernels are unavailable (%s); using the torch paths", e)
    _loaded["lib"] = kernels
    return kernels


def _build(cache_dir: Path) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    sources = [p.read_bytes() for p in SOURCES]
    version = subprocess.run([cc, "--version"], capture_output=True, check=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([*sources, version, " ".join(FLAGS).encode(), _cpu_identity()])).hexdigest()[:16]
    target = cache_dir / f"kernels-{key}.so"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: a concurrent builder finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_identity() -> bytes:
    """-march=native code runs only on CPUs with the same features."""
    flags = b""
    try:
        for line in Path("/proc/cpuinfo").read_bytes().splitlines():
            if line.startswith((b"flags", b"Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine().encode() + flags


def _default_cache() -> Path:
    from adapterd.engine.demo import default_cache_dir

    return default_cache_dir() / "kernels"
