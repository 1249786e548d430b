"""What the CLI's persistent compilation cache (bdjax/compile_cache.py) saves: the same `bdjax` command
run twice in fresh processes, the first with an empty cache, the second loading what the first
compiled; one JSON line with both runs' wall, training and defense times, their results, and
whether the fine-tuned models are bitwise identical.

    python benchmarks/compile_cache.py [--recipe recipes/quickstart.py] [--config.key=value ...]

The runs use a temporary $BDJAX_CACHE whose model, data, download and kernel directories point to
the real cache's (so nothing is fetched or rebuilt) and whose `xla/` starts empty; the real
cache's compiled programs are neither read nor touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bdjax import compile_cache
from bdjax.checkpoints.assets import cache_dir

SHARED = ("models", "data", "downloads", "kernels")  # everything in the cache except compiled programs


def run(recipe: str, overrides: list[str], workdir: Path, env: dict) -> dict:
    """One `bdjax` run in a fresh process; its wall time and what its results.json reports."""
    cmd = [sys.executable, "-m", "bdjax.main", f"--config={recipe}", f"--config.workdir={workdir}", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads((workdir / "results.json").read_text())
    summary = results.get("summary", {})
    model = workdir / "final" / "model.safetensors"
    return {"wall_s": round(wall, 1), "train_s": round(summary.get("train_seconds", float("nan")), 1),
            "defense_s": round(sum(d["seconds"] for d in results.get("defenses", [])), 1),
            "rows": [{k: r.get(k) for k in ("name", "variant", "cacc", "asr")} for r in results.get("rows", [])],
            "defenses": [{k: d[k] for k in ("name", "cacc", "asr")} for d in results.get("defenses", [])],
            "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest() if model.exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/quickstart.py")
    args, overrides = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        cache.mkdir(mode=0o700)
        for name in SHARED:
            if (cache_dir() / name).is_dir():
                (cache / name).symlink_to(cache_dir() / name)
        env = {**os.environ, "BDJAX_CACHE": str(cache), "BDJAX_COMPILATION_CACHE": "1"}
        first = run(args.recipe, overrides, tmp / "first", env)
        xla = cache / "xla" / compile_cache.machine_key()
        programs = [p for p in xla.iterdir() if p.name.endswith("-cache")]
        cached_bytes = sum(p.stat().st_size for p in programs)
        second = run(args.recipe, overrides, tmp / "second", env)
    print(json.dumps({"benchmark": "compile_cache", "recipe": args.recipe, "overrides": overrides,
                      "programs_cached": len(programs), "cached_mb": round(cached_bytes / 2**20, 1),
                      **{f"first_{k}": v for k, v in first.items()}, **{f"rerun_{k}": v for k, v in second.items()},
                      "wall_saved_s": round(first["wall_s"] - second["wall_s"], 1),
                      "same_model": first["model_sha256"] is not None and first["model_sha256"] == second["model_sha256"],
                      "same_results": (first["rows"], first["defenses"]) == (second["rows"], second["defenses"])}))


if __name__ == "__main__":
    main()
