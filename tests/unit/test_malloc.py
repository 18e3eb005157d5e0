"""The server's malloc settings keep freed memory for reuse, and leave the user's own alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from adapterd.__main__ import build_parser
from adapterd.config import Config
from adapterd.malloc import tune_malloc, user_allocator_settings

# An engine thread's pattern: blocks of 64 KiB-4 MiB allocated, touched and freed every
# step, a few living longer. Page faults are counted after a warm-up, in steady state.
CHURN = textwrap.dedent("""
    import random, resource, sys, threading, torch
    from adapterd.malloc import tune_malloc
    tuned = sys.argv[1] == "tuned" and tune_malloc()
    faults = []
    def work():
        rng = random.Random(0)
        keep = []
        for i in range(500):
            if i == 150:
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            step = [torch.ones(rng.randint(16, 1024) * 1024) for _ in range(6)]
            keep.append(torch.ones(rng.randint(1, 64) * 1024))
            if len(keep) > 20:
                keep.pop(rng.randrange(len(keep)))
            del step
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(int(tuned), faults[1] - faults[0])
""")


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (ValueError, OSError):
        return False


def _churn(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    tuned, faults = out.stdout.split()
    return tuned == "1", int(faults)


@pytest.mark.slow
@pytest.mark.skipif(not _glibc(), reason="mallopt settings are glibc's")
def test_tuned_malloc_stops_returning_and_refaulting_memory_every_step():
    tuned, tuned_faults = _churn("tuned")
    assert tuned, "glibc refused a setting"
    _, default_faults = _churn("default")
    assert default_faults > 2000  # glibc's defaults hand the memory back and fault it in again
    assert tuned_faults * 2 < default_faults, (tuned_faults, default_faults)


@pytest.mark.parametrize("env", [
    {"MALLOC_ARENA_MAX": "2"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
])
def test_the_users_allocator_settings_win(monkeypatch, env):
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD"):
            monkeypatch.delenv(name)
    assert user_allocator_settings() is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert user_allocator_settings() == next(iter(env))
    assert tune_malloc() is False


def test_serve_tunes_malloc_unless_told_not_to():
    parse = build_parser().parse_args
    assert Config.from_args(parse(["serve"])).model.malloc_tuning is True
    assert Config.from_args(parse(["serve", "--no-malloc-tuning"])).model.malloc_tuning is False
