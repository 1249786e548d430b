"""Directories of code bdjax runs from its cache: only ever the current user's own.

Two caches under $BDJAX_CACHE hold machine code that bdjax loads and runs: the compiled C++
kernels (`bdjax/kernels/build.py`) and XLA's compiled programs (`bdjax/compile_cache.py`). Whoever
can write there can make a bdjax process run their code, so such a directory is used only if it
is owned by the current user and nobody else can write to it (the rule ssh applies to ~/.ssh).
bdjax creates these directories readable by the current user only; one that fails the check is
left as it is, and the caller runs without it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UntrustedDirectory(Exception):
    """A code cache directory (or a file in it) that someone other than the current user could write."""


def check_private(path: Path) -> None:
    """Raise UntrustedDirectory unless `path` (a directory or file; symlinks followed) is owned by
    the current user and not writable by group or others."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise UntrustedDirectory(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedDirectory(f"{path} is writable by other users (mode {stat.filemode(st.st_mode)}); "
                                 f"run `chmod go-w {path}` to use it")


def private_dir(root: Path, *parts: str) -> Path:
    """`root`/`parts`, created where missing with mode 0700; every directory from `root` down is
    checked by `check_private` (UntrustedDirectory if one fails)."""
    dirs = [Path(root)]
    for part in parts:
        dirs.append(dirs[-1] / part)
    for path in dirs:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.is_dir():
            raise UntrustedDirectory(f"{path} is not a directory")
        check_private(path)
    return dirs[-1]
