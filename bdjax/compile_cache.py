"""JAX's persistent compilation cache, kept per machine in bdjax's cache directory.

XLA compiles each program a run needs when it is first called: the quickstart's fine-tune compiles
its train step at 5 row widths, 4-6 s each on a 2-core CPU, and evaluation, generation and the
defenses compile their own. The `bdjax` CLI turns on JAX's persistent cache, so a rerun of a
recipe (or another recipe with the same shapes) loads those executables from disk instead.

A cached executable is machine code the process runs, so the cache is trusted code (JAX's docs say
as much). It lives in $BDJAX_CACHE/xla/<machine key>, created readable by the current user only
and used only while every directory from $BDJAX_CACHE down is the current user's and writable by
no one else (`bdjax.private_dir`); otherwise a warning says why and the run compiles as if there
were no cache. The machine key hashes the jax and jaxlib versions and the CPU's feature flags: XLA
builds CPU code for the host's instruction set, and JAX's own cache key does not name it, so two
machines sharing a home directory never load each other's executables.

The cache is bounded (`MAX_BYTES`, least recently used entries evicted first) and only keeps
programs that took at least `MIN_COMPILE_S` to compile. BDJAX_COMPILATION_CACHE=0 turns it off.
The benchmarks never turn it on, so the compile times they report are cold ones.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

MAX_BYTES = 2 << 30
MIN_COMPILE_S = 1.0
_OFF = ("0", "off", "false", "no")


def machine_key() -> str:
    """A short hash of what an executable compiled here is tied to: jax, jaxlib, CPU features."""
    import jax
    import jaxlib

    from bdjax.kernels.build import cpu_flags

    parts = [jax.__version__, jaxlib.__version__, platform.machine(), cpu_flags()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def enable(env=os.environ, *, min_compile_s: float = MIN_COMPILE_S) -> Path | None:
    """Point JAX's persistent compilation cache at $BDJAX_CACHE/xla/`machine_key()`; returns that
    directory, or None when the cache is off (BDJAX_COMPILATION_CACHE=0) or its directory is not
    private (with a RuntimeWarning).
    Call before the first compilation: JAX fixes its cache when it first compiles."""
    if env.get("BDJAX_COMPILATION_CACHE", "1").strip().lower() in _OFF:
        return None
    import jax

    from bdjax.checkpoints.assets import cache_dir
    from bdjax.private_dir import UntrustedDirectory, private_dir

    try:
        path = private_dir(cache_dir(), "xla", machine_key())
    except (OSError, UntrustedDirectory) as e:
        warnings.warn(f"bdjax runs without a compilation cache: {e}", RuntimeWarning, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
