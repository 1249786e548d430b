"""The persistent compilation cache: a rerun loads what the first run compiled, and only from a
directory that is the current user's own."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from bdjax import compile_cache
from bdjax.private_dir import UntrustedDirectory, check_private, private_dir

# One process: turn the cache on, compile a function, report JAX's cache events and the result.
_RUN = """
import json, sys
import jax, jax.numpy as jnp
from bdjax import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = compile_cache.enable(min_compile_s=0.0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
out = f(jnp.arange(64.0).reshape(8, 8) / 64)
print(json.dumps({"path": str(path), "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"), "out": out.tolist()}))
"""


def _run(tmp_path, **env):
    proc = subprocess.run([sys.executable, "-c", _RUN], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BDJAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu", **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_first_ones_executable(tmp_path):
    first = _run(tmp_path)
    assert first["path"] == str(tmp_path / "xla" / compile_cache.machine_key())
    assert first["hits"] == 0 and first["misses"] >= 1
    entries = [p.name for p in (tmp_path / "xla" / compile_cache.machine_key()).iterdir()]
    assert any(name.endswith("-cache") for name in entries)
    for d in (tmp_path / "xla", tmp_path / "xla" / compile_cache.machine_key()):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700  # created private
    second = _run(tmp_path)
    assert (second["hits"], second["misses"]) == (first["misses"], 0)  # every program loaded, none compiled
    assert second["out"] == first["out"]
    # turned off: no cache, so it compiles again
    off = _run(tmp_path, BDJAX_COMPILATION_CACHE="0")
    assert off["path"] == "None" and off["hits"] == 0


def test_a_directory_others_can_write_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path))
    shared = tmp_path / "xla"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UntrustedDirectory, match="writable by other users.*chmod go-w"):
        private_dir(tmp_path, "xla", "key")
    with pytest.warns(RuntimeWarning, match="without a compilation cache: .*xla is writable by other users"):
        assert compile_cache.enable() is None
    assert not (shared / compile_cache.machine_key()).exists()  # nothing written into it
    shared.chmod(0o755)  # group and others may read, not write: fine
    assert private_dir(tmp_path, "xla", "key") == shared / "key"
    check_private(shared / "key")
    (shared / "key").chmod(0o720)
    with pytest.raises(UntrustedDirectory, match="writable by other users"):
        check_private(shared / "key")


def test_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "xla").write_text("not a directory")
    with pytest.raises((UntrustedDirectory, OSError)):
        private_dir(tmp_path, "xla")


def test_the_console_script_turns_it_on(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bdjax.main", "--help"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "BDJAX_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "xla" / compile_cache.machine_key()).is_dir()
