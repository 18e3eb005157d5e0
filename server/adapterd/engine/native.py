"""The engine's own C kernel (paged_attn.c), compiled on first use and loaded with ctypes.

The shared object goes to the cache directory under a name derived from the source, the
compiler, its flags and this CPU, so a changed kernel or another machine builds anew, and a
second start loads it at once. Compiling takes about a second; where there is no C compiler
(or the build fails) `load()` returns None with one log line, and attention falls back to
the plain torch path (attention.py), which is slower on long contexts but the same math.

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
from pathlib import Path

import torch  # noqa: F401 - loads torch's libgomp before ours (see above)

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attn.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_ARGTYPES = [ct.c_void_p] * 7 + [ct.c_int64] * 6 + [ct.c_float]

_loaded: dict[str, object] = {}


def load(cache_dir: Path | None = None):
    """The kernel's `paged_decode_f32` as a ctypes function, or None where it cannot be built."""
    if "fn" in _loaded:
        return _loaded["fn"]
    fn = None
    try:
        path = _build(Path(cache_dir) if cache_dir else _default_cache())
        lib = ct.CDLL(str(path))
        fn = lib.paged_decode_f32
        fn.argtypes, fn.restype = _ARGTYPES, None
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("paged attention C kernel unavailable (%s); using the torch path", e)
    _loaded["fn"] = fn
    return fn


def _build(cache_dir: Path) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, check=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, version, " ".join(FLAGS).encode(), _cpu_identity()])).hexdigest()[:16]
    target = cache_dir / f"paged_attn-{key}.so"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".paged_attn-", suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
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
