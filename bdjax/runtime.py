"""Process-level settings for running XLA on CPU.

`reuse_freed_memory()` keeps glibc malloc from handing XLA:CPU's large per-step buffers back to
the kernel. XLA:CPU allocates each execution's temporaries with posix_memalign from its worker
threads (2.2 GB for the SmolLM2-135M LoRA step at batch 8 x 128). glibc serves a block that large
with a fresh mmap (always, from a thread's non-main arena) and unmaps it on free, so every step
page-faults its whole working set back in: ~600k minor faults and ~1 s of kernel time per step on
a 2-core machine, about 10% of the step. With a single arena, no mmap and no trimming, the freed
blocks stay mapped and are reused: 0 faults per step. The price is that the process keeps its
peak heap: resident memory stays at its high-water mark instead of shrinking between steps (3.1 GB
vs 2.9 GB peak for that benchmark; up to 7.8 GB when applied before anything was imported, where
the compiler's transient memory also stays in the heap).

It must run before JAX creates its CPU client (the first array or jit call), since threads that
already own a malloc arena keep it; the CLI calls it first thing. Linux/glibc only; elsewhere,
or with BDJAX_REUSE_FREED_MEMORY=0, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def reuse_freed_memory() -> bool:
    """Configure glibc malloc to keep freed memory for reuse; True if it was (or already is) applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("BDJAX_REUSE_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 is read as SIZE_MAX: never trim the heap top (a positive int could not exceed 2 GB).
    _applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1))
    return _applied
