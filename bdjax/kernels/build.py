"""Compile bdjax's C++ XLA:CPU kernels on first use and register them with JAX.

A kernel's source ships with the package (`bdjax/kernels/*.cc`); it is compiled once per machine
with the system C++ compiler (`$CXX`, else `c++`) against the XLA FFI headers that jaxlib ships,
for this CPU (`-march=native`), into the cache ($BDJAX_CACHE/kernels, default
~/.cache/bdjax/kernels). The file name carries a hash of everything that shapes the binary (source,
compiler and its version, flags, jaxlib version, CPU flags), so a changed input builds a new
library instead of loading a stale one. A build writes a temporary file and renames it into place,
so an interrupted or concurrent build never leaves a partial library to load. The library is
code bdjax runs, so the kernels directory must be the current user's own (`bdjax.private_dir`).

No compiler, a failed build, a kernels directory others can write, or a platform without ELF
shared libraries: `load` returns None (with the reason in `failure`), and callers fall back to
XLA's own ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bdjax.checkpoints.assets import cache_dir
from bdjax.private_dir import UntrustedDirectory, check_private, private_dir

_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_SUBDIR = "kernels"  # under $BDJAX_CACHE
_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL | None] = {}
failure: dict[str, str] = {}


def cpu_flags() -> str:
    """This CPU's feature flags (/proc/cpuinfo), else its processor name: part of cache keys for code built for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"the C++ compiler {cxx!r} does not run ({cxx} --version exits {out.returncode})")
    return out.stdout.splitlines()[0] if out.stdout else ""


def library_path(name: str, cxx: str) -> Path:
    """Where the compiled `name` kernel for this machine and toolchain lives in the cache."""
    import jax
    import jaxlib

    source = (Path(__file__).parent / f"{name}.cc").read_bytes()
    key = hashlib.sha256(b"\0".join([source, cxx.encode(), _compiler_version(cxx).encode(), " ".join(_FLAGS).encode(),
                                     jaxlib.__version__.encode(), cpu_flags().encode(),
                                     jax.ffi.include_dir().encode()])).hexdigest()[:16]
    return cache_dir() / _SUBDIR / f"{name}-{key}.so"


def compile_kernel(name: str, cxx: str, out: Path) -> None:
    """Compile bdjax/kernels/<name>.cc into the shared library `out` (atomically)."""
    import jax

    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(Path(__file__).parent / f"{name}.cc"), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library `name` (built on first use), or None if it cannot be built here or
    the kernels directory (or the library) is not the current user's alone (`bdjax.private_dir`)."""
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        lib = None
        try:
            if not sys.platform.startswith("linux"):
                raise RuntimeError(f"C++ kernels are built on Linux only, not {sys.platform}")
            cxx = os.environ.get("CXX") or "c++"
            if shutil.which(cxx) is None:
                raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set CXX)")
            path = library_path(name, cxx)
            private_dir(cache_dir(), _SUBDIR)
            if not path.exists():
                compile_kernel(name, cxx, path)
            check_private(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError, UntrustedDirectory) as e:
            failure[name] = str(e)
        _LOADED[name] = lib
        return lib
