"""Streamed fine-mixing of checkpoint files: peak memory independent of model size, throughput
against a plain file copy of the same bytes, one JSON line.

Two synthetic Llama-family HF checkpoint pairs (backdoored, pretrained) of ~0.5 GB and ~4 GB,
float32, the same width (hidden 1024, intermediate 4096, vocab 32000) and different depths, so
the largest tensor (the embedding) is the same in both. Each is cleaned with
`bdjax.checkpoints.stream.stream_defense([fine_mix(keep=0.6)], ...)` (random mask, the paper's
mixing) in a fresh process, which reports its own peak RSS (ru_maxrss) and the call's seconds; the
baseline copies the backdoored directory file by file (shutil.copyfile) into the same disk, also
in a fresh process. Copy and mix alternate (copy, mix, copy, mix, ...), each preceded by a read
of its inputs (a page cache that drops idle pages, e.g. DAMON's proactive reclaim, would otherwise
send the mix, which reads twice the bytes, to the disk), and the best time of each counts. Targets
(issue): peak RSS of the two sizes within 25%, mix throughput >= 50% of the copy's on the large
pair. The times vary with the load on the machine: the `*_runs` keys and `load_avg` show how much.

The inputs are written as bdjax writes checkpoints (data sections 64-byte aligned, so the mix maps
each tensor in place); `--hf-layout` writes them as the `safetensors` library does (8-byte aligned,
read with plain file I/O instead). The mix writes its output around the page cache (O_DIRECT);
`--buffered` writes through it, as the copy does.

    python benchmarks/defend_stream.py [--small-gb 0.5] [--large-gb 4] [--repeats 3] [--workdir DIR]
                                       [--hf-layout] [--buffered]

The checkpoints are written once, tensor by tensor, under --workdir (default
~/.cache/bdjax/bench_defend_stream) and reused while their description matches; outputs are
deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bdjax.checkpoints.hf import INDEX  # noqa: E402
from bdjax.checkpoints.layout import _hf_shapes, _parse, expected_names  # noqa: E402
from bdjax.checkpoints.tensorfile import write_stream  # noqa: E402
from bdjax.models.config import ModelConfig  # noqa: E402

GB = 1e9
SHARD_BYTES = 2**30  # shards of at most 1 GiB
KEEP = 0.6
WIDTH = dict(family="llama", vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_heads=16,
             num_kv_heads=16, head_dim=64)
VERSION = 1  # bump when the synthetic content changes


def config_for(target_gb: float) -> ModelConfig:
    """The layer count whose float32 checkpoint is closest to `target_gb` (at least one layer)."""
    one = ModelConfig(num_layers=1, **WIDTH)
    two = ModelConfig(num_layers=2, **WIDTH)
    per_layer = (two.num_params() - one.num_params()) * 4
    fixed = one.num_params() * 4 - per_layer
    layers = max(1, round((target_gb * GB - fixed) / per_layer))
    return ModelConfig(num_layers=layers, **WIDTH)


def checkpoint_bytes(config: ModelConfig) -> int:
    return config.num_params() * 4


def _shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    shapes = _hf_shapes(config)
    return [(name, shapes[_parse(config, name)[0]]) for name in expected_names(config)]


def _tensor(i: int, shape: tuple[int, ...], backdoored: bool) -> np.ndarray:
    """Tensor i of the pretrained checkpoint, or of the backdoored one (pretrained + small noise),
    from per-tensor seeds so that either can be regenerated alone."""
    x = np.random.default_rng([VERSION, i]).standard_normal(shape, np.float32)
    x *= np.float32(0.02)
    if backdoored:
        noise = np.random.default_rng([VERSION, i, 1]).standard_normal(shape, np.float32)
        noise *= np.float32(1e-3)
        x += noise
    return x


def build(path: Path, config: ModelConfig, backdoored: bool, align: int) -> None:
    """An HF directory (config.json, 1 GiB shards, index), written one tensor at a time, its data
    sections `align`-byte aligned; kept if one with the same description is already there."""
    desc = {"version": VERSION, "backdoored": backdoored, "config": config.to_hf(),
            "bytes": checkpoint_bytes(config), "align": align}
    marker = path / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == desc:
        return
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    begin = time.perf_counter()
    items = _shapes(config)
    shards: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for i, (name, shape) in enumerate(items):
        nbytes = int(np.prod(shape)) * 4
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((i, name, shape))
        size += nbytes
    weight_map = {}
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        write_stream(path / fname, [(name, np.float32, shape) for _, name, shape in shard],
                     (_tensor(i, shape, backdoored) for i, _, shape in shard), align=align)
        weight_map.update({name: fname for _, name, _ in shard})
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": checkpoint_bytes(config)},
                                          "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    marker.write_text(json.dumps(desc))
    log(f"built {path} ({checkpoint_bytes(config) / GB:.2f} GB, {len(shards)} shards) "
        f"in {time.perf_counter() - begin:.1f} s")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def warm(path: Path) -> None:
    """Read a directory's files once so the first timed run does not pay for the disk alone."""
    for f in sorted(path.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            buf = bytearray(64 * 2**20)
            while fh.readinto(buf):
                pass


def jax_version() -> str:
    from importlib.metadata import version
    return version("jax")


def log(msg: str) -> None:
    print(f"[defend_stream] {msg}", file=sys.stderr, flush=True)


# ---- children: one measurement per fresh process ------------------------------------------

def child(args) -> None:
    out = Path(args.out)
    if args.child == "copy":
        begin = time.perf_counter()
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.mkdir(parents=True)
        for f in sorted(Path(args.src).iterdir()):
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, out)
        seconds = time.perf_counter() - begin
    else:
        if not args.default_malloc:
            from bdjax import runtime
            runtime.reuse_freed_memory()  # as the bdjax CLI does on CPU, before JAX starts
        import jax

        from bdjax.checkpoints.stream import stream_defense
        from bdjax.defenses.mixing import fine_mix

        t = fine_mix(KEEP, mode=args.child)
        begin = time.perf_counter()
        stream_defense([t], args.src, args.pre, out, jax.random.key(0), direct=not args.buffered)
        seconds = time.perf_counter() - begin
    print(json.dumps({"seconds": seconds, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(kind: str, src: Path, out: Path, pre: Path | None = None, default_malloc: bool = False,
              buffered: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--src", str(src), "--out", str(out)]
    if pre is not None:
        cmd += ["--pre", str(pre)]
    if default_malloc:
        cmd.append("--default-malloc")
    if buffered:
        cmd.append("--buffered")
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        for f in src.iterdir():  # the same files; a safetensors header may be padded differently (< 64 bytes)
            if f.is_file() and not 0 <= (out / f.name).stat().st_size - f.stat().st_size < 64:
                raise RuntimeError(f"{out / f.name} holds {(out / f.name).stat().st_size} bytes, {f} {f.stat().st_size}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(f".{out.name}.tmp"), ignore_errors=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    log(f"{kind:8s} {src.name}: {r['seconds']:.2f} s, peak RSS {r['maxrss_mb']:.0f} MB")
    return r


def measure(pair: tuple[Path, Path], out: Path, repeats: int, default_malloc: bool, buffered: bool) -> dict:
    bd, pre = pair
    copies, mixes = [], []
    for _ in range(repeats):  # inputs re-read just before each run: the page cache may drop idle pages
        warm(bd)
        copies.append(run_child("copy", bd, out))
        warm(bd)
        warm(pre)
        mixes.append(run_child("random", bd, out, pre, default_malloc, buffered))
    nbytes = dir_bytes(bd)
    copy_s = min(r["seconds"] for r in copies)
    mix_s = min(r["seconds"] for r in mixes)
    return {"gb": round(nbytes / GB, 3), "copy_s": round(copy_s, 3), "mix_s": round(mix_s, 3),
            "copy_gbps": round(nbytes / copy_s / GB, 3), "mix_gbps": round(nbytes / mix_s / GB, 3),
            "copy_s_runs": [round(r["seconds"], 2) for r in copies],
            "mix_s_runs": [round(r["seconds"], 2) for r in mixes],
            "rss_mb": round(max(r["maxrss_mb"] for r in mixes), 1),
            "rss_mb_runs": [round(r["maxrss_mb"], 1) for r in mixes],
            "copy_rss_mb": round(max(r["maxrss_mb"] for r in copies), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-gb", type=float, default=0.5)
    ap.add_argument("--large-gb", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3, help="copy/mix alternations per size; the best time counts")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/bdjax/bench_defend_stream"))
    ap.add_argument("--no-selected", action="store_true", help="skip the mode='selected' run on the small pair")
    ap.add_argument("--hf-layout", action="store_true",
                    help="write the inputs as the safetensors library does (data 8-byte aligned), so that "
                         "tensors are read with plain file I/O rather than mapped in place")
    ap.add_argument("--default-malloc", action="store_true",
                    help="do not apply bdjax.runtime.reuse_freed_memory() in the mixing process (the CLI does)")
    ap.add_argument("--buffered", action="store_true",
                    help="write the mixed checkpoint through the page cache (stream_defense(direct=False))")
    ap.add_argument("--child", choices=("copy", "random", "selected"), help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--pre", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    load_before = os.getloadavg()[:1]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    small, large = config_for(args.small_gb), config_for(args.large_gb)
    align = 8 if args.hf_layout else 64
    dirs = {name: f"{name}-align{align}" for name in ("small", "large")}
    note = None

    def missing(config: ModelConfig, name: str) -> int:  # bytes still to write for a pair
        total = 0
        for which in ("backdoored", "pretrained"):
            marker = work / dirs[name] / which / "bench.json"
            ok = marker.is_file() and json.loads(marker.read_text()).get("bytes") == checkpoint_bytes(config)
            total += 0 if ok else checkpoint_bytes(config)
        return total

    free = shutil.disk_usage(work).free
    need = missing(small, "small") + missing(large, "large") + checkpoint_bytes(large)  # + one output at a time
    if need * 1.05 > free:
        shutil.rmtree(work / dirs["large"], ignore_errors=True)  # rebuilt smaller below
        budget = (free - missing(small, "small")) / 3 / 1.05
        requested = args.large_gb
        large = config_for(budget / GB)
        while large.num_layers > 1 and checkpoint_bytes(large) > budget:
            large = ModelConfig(**{**large.__dict__, "num_layers": large.num_layers - 1})
        note = (f"only {free / GB:.1f} GB free on {work} (needs ~{need / GB:.1f} GB): large checkpoint reduced from "
                f"{requested} GB to {checkpoint_bytes(large) / GB:.2f} GB")
        log(note)

    pairs = {}
    for name, config in (("small", small), ("large", large)):
        pairs[name] = (work / dirs[name] / "backdoored", work / dirs[name] / "pretrained")
        build(pairs[name][0], config, backdoored=True, align=align)
        build(pairs[name][1], config, backdoored=False, align=align)
    out = work / "out"
    res = {name: measure(pairs[name], out, args.repeats, args.default_malloc, args.buffered)
           for name in ("small", "large")}
    selected = None
    if not args.no_selected:
        warm(pairs["small"][0])
        warm(pairs["small"][1])
        r = run_child("selected", pairs["small"][0], out, pairs["small"][1], args.default_malloc, args.buffered)
        selected = {"small_selected_s": round(r["seconds"], 3),
                    "small_selected_gbps": round(res["small"]["gb"] / r["seconds"], 3),
                    "small_selected_rss_mb": round(r["maxrss_mb"], 1)}

    s, l = res["small"], res["large"]
    ratio = l["rss_mb"] / s["rss_mb"]
    vs_copy = l["mix_gbps"] / l["copy_gbps"]
    line = {"benchmark": "defend_stream", "transform": f"fine_mix(keep={KEEP}, random, tensor)",
            "small_gb": s["gb"], "large_gb": l["gb"], "small_layers": small.num_layers,
            "large_layers": large.num_layers, "largest_tensor_mb": round(32000 * 1024 * 4 / 1e6, 1),
            "small_rss_mb": s["rss_mb"], "large_rss_mb": l["rss_mb"], "rss_ratio": round(ratio, 3),
            "throughput_vs_copy": round(vs_copy, 3), "input_alignment": align,
            "rss_within_25pct": bool(abs(ratio - 1) < 0.25), "throughput_ok": bool(vs_copy >= 0.5),
            **{f"small_{k}": v for k, v in s.items() if k not in ("gb", "rss_mb")},
            **{f"large_{k}": v for k, v in l.items() if k not in ("gb", "rss_mb")},
            **(selected or {}), "direct_writes": not args.buffered, "repeats": args.repeats, "reuse_freed_memory": not args.default_malloc,
            "cpu_count": os.cpu_count(), "load_avg": [round(x, 2) for x in load_before + os.getloadavg()[:1]],
            "jax_version": jax_version()}
    if note:
        line["note"] = note
    print(json.dumps(line))


if __name__ == "__main__":
    main()
