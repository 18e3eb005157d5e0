"""glibc malloc settings for a long-running server: keep freed memory for the next step.

By default glibc hands memory back to the kernel as soon as the free space at the top of a
heap passes a small threshold (twice the mmap threshold, which starts at 128 KiB), and
serves large blocks with a fresh mmap. A decode step on the CPU allocates and frees the same
few megabytes of activations, KV rows and per-row LoRA stacks over and over, so the memory
went back and came again every step: each time as page faults (zeroed pages), 35,000-80,000
per `bench/serve.py` pass, with 0.4-1.2 s of system time. With these settings the same pass
takes 2,000-5,000 faults and 0.1-0.25 s (see tests/unit/test_malloc.py for the behaviour).

The cost is memory: the process keeps up to `TRIM_THRESHOLD` of freed heap instead of
returning it, the usual trade of a server (TGI and vLLM CPU images swap in tcmalloc or
jemalloc for the same reason). Settings the user made win: with any MALLOC_* variable or
GLIBC_TUNABLES in the environment, or under another allocator's LD_PRELOAD, this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling (half its 64 MiB heap size); larger blocks still get mmap
TRIM_THRESHOLD = 512 * 2**20
TOP_PAD = 64 * 2**20


def user_allocator_settings() -> str | None:
    """What in the environment already chose the allocator's behaviour, if anything."""
    for name in os.environ:
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            return name
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload:
        return "LD_PRELOAD"
    return None


def tune_malloc() -> bool:
    """Apply the settings above to this process. Returns True when glibc took all three."""
    if not sys.platform.startswith("linux"):
        return False
    reason = user_allocator_settings()
    if reason is not None:
        log.info("malloc left as configured: %s is set", reason)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl and other libcs have no such parameters: mallopt returns 0 and nothing changes.
    return all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    )
