"""Run elementwise defenses on checkpoint files, one tensor at a time.

`stream_defense` reads the backdoored and pretrained HF safetensors directories one tensor at a
time (mapped in place where aligned, `TensorFile.read`; the next tensor on a reader thread), and
for each tensor converts both to bdjax's layout, applies the transforms in order
(`bdjax.defenses.base.Elementwise`, keyed by the tensor's name exactly as in memory) and writes
the result into an output file with the same shard layout (on a writer thread, with O_DIRECT where
the file system allows). Peak memory is a few copies of the largest tensor, whatever the model's
size; tensors no transform touches are copied byte for byte. Statistics a transform needs (e.g. a
global mixing threshold) are gathered in extra passes first. Timings: `benchmarks/defend_stream.py`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from bdjax.checkpoints.hf import INDEX, weight_files
from bdjax.checkpoints.layout import tensor_codec, tensor_path
from bdjax.checkpoints.tensorfile import TensorFile, write_stream
from bdjax.defenses.base import Elementwise, TensorItem, path_crc, tensor_key_from_crc
from bdjax.errors import CheckpointError
from bdjax.io import staged_dir
from bdjax.models.config import ModelConfig


class _Tensors:
    """name -> memory-mapped tensor over every shard of an HF directory."""

    def __init__(self, path: Path):
        self.files = [TensorFile(f) for f in weight_files(path)]
        self.where = {name: f for f in self.files for name in f.keys()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.where[name].read(name)  # nothing of it stays resident once dropped


def _check_pair(config: ModelConfig, pre_config: ModelConfig, bd: _Tensors, pre: _Tensors) -> None:
    if config.vocab_size != pre_config.vocab_size:
        raise CheckpointError(f"vocabulary mismatch: the backdoored checkpoint has {config.vocab_size} tokens, the "
                              f"pretrained one {pre_config.vocab_size}; defenses need the same tokenizer")
    if bd.where.keys() != pre.where.keys():
        only = sorted(bd.where.keys() ^ pre.where.keys())
        raise CheckpointError(f"the backdoored and pretrained checkpoints hold different tensors (e.g. {only[:3]}); "
                              "they are not the same architecture")
    for name in bd.where:
        a, b = bd.where[name].entries[name][1], pre.where[name].entries[name][1]
        if a != b:
            raise CheckpointError(f"{name} has shape {a} in the backdoored checkpoint but {b} in the pretrained one: "
                                  "not the same architecture")


def _touched(config: ModelConfig, transforms: Sequence[Elementwise], name: str) -> bool:
    path = tensor_path(config, name)
    return path is not None and any(t.touches(path) for t in transforms)


class _Programs:
    """The jitted pipeline of each tensor: both layout conversions, the first `upto` transforms
    with their per-tensor keys, and (for the output) the cast back to the file's dtype, fused by
    XLA into one program.

    A tensor's name enters its program only through arguments (the path's CRC and the layer tag
    that make its key), so one program serves a path in every layer, and paths of one kind and
    shape (q/k/v, gate/up, the norms) lower to the same module, compiled once. Compiling runs on
    worker threads from when a program is first asked for, so the main thread goes on mixing."""

    def __init__(self, config: ModelConfig, transforms: Sequence[Elementwise], bd: _Tensors, pre: _Tensors):
        self.config, self.transforms, self.bd, self.pre = config, transforms, bd, pre
        self.by_tensor: dict = {}  # (name, upto, to_file) -> (future of the executable, its key arguments)
        self.by_path: dict = {}  # (path, upto, to_file, shapes and dtypes) -> future of the executable
        self.by_module: dict[str, Future] = {}  # lowered module text -> its executable
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                       thread_name_prefix="bdjax-compile")

    def get(self, name: str, upto: int, to_file: bool, keys: list, stats: list) -> Callable:
        """fn(backdoored tensor, pretrained tensor), both in the files' layout."""
        if (name, upto, to_file) not in self.by_tensor:
            path, layer, to_ours, to_hf = tensor_codec(self.config, name)
            structs = tuple((t.where[name].entries[name][1], t.where[name].entries[name][0])
                            for t in (self.bd, self.pre))
            cache_key = (path, upto, to_file, structs)
            if cache_key not in self.by_path:
                transforms = self.transforms[:upto]

                def run(bd_hf, pre_hf, ks, sts, crc, tag):
                    x, p = to_ours(bd_hf), to_ours(pre_hf)
                    for t, k, st in zip(transforms, ks, sts):
                        if t.touches(path):
                            x = t.fn(path, x, p, tensor_key_from_crc(k, crc, tag), st).astype(x.dtype)
                    return to_hf(x).astype(bd_hf.dtype) if to_file else (x, p)

                args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in structs]
                lowered = jax.jit(run).lower(*args, keys, stats, np.uint32(0), np.uint32(0))
                text = lowered.as_text()
                if text not in self.by_module:
                    self.by_module[text] = self.pool.submit(lowered.compile)
                self.by_path[cache_key] = self.by_module[text]
            extra = (np.uint32(path_crc(path)), np.uint32(0 if layer is None else layer + 1))
            self.by_tensor[name, upto, to_file] = (self.by_path[cache_key], extra)
        future, extra = self.by_tensor[name, upto, to_file]
        return lambda b, p: future.result()(b, p, keys, stats, *extra)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def stream_defense(transforms: Sequence[Elementwise], backdoored: str | Path, pretrained: str | Path,
                   out: str | Path, key: jax.Array, *, direct: bool = True) -> Path:
    """Write `transforms` (applied in order, transform i keyed by fold_in(key, i), as `chain` does)
    of the backdoored checkpoint into the HF directory `out`; it appears only when complete.
    `direct`: write the weights around the page cache where the file system allows it
    (`bdjax.checkpoints.tensorfile.write_stream`)."""
    backdoored, pretrained, out = Path(backdoored), Path(pretrained), Path(out)
    config = ModelConfig.from_file(backdoored / "config.json")
    pre_config = ModelConfig.from_file(pretrained / "config.json")
    bd, pre = _Tensors(backdoored), _Tensors(pretrained)
    _check_pair(config, pre_config, bd, pre)
    keys = [jax.random.fold_in(key, i) for i in range(len(transforms))]
    names = [n for f in bd.files for n in f.keys()]
    mixed = {n for n in names if _touched(config, transforms, n)}

    def pipeline(name: str, upto: int, to_file: bool):
        return programs.get(name, upto, to_file, keys[:upto], stats[:upto])

    def tensors_after(upto: int) -> Iterator[TensorItem]:
        for name in names:
            path = tensor_path(config, name)
            if path is not None and transforms[upto].touches(path):  # stats see only what they act on
                x, p = pipeline(name, upto, False)(bd[name], pre[name])
                yield path, tensor_codec(config, name)[1], np.asarray(x), np.asarray(p)

    def inputs(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        return bd[name], (pre[name] if name in mixed else None)

    def arrays(f: TensorFile) -> Iterator[np.ndarray]:
        order = f.keys()
        ahead = reader.submit(inputs, order[0]) if order else None
        for i, name in enumerate(order):
            x, p = ahead.result()  # read on the reader thread while the previous tensor was mixed
            ahead = reader.submit(inputs, order[i + 1]) if i + 1 < len(order) else None
            new = x if p is None else np.asarray(pipeline(name, len(transforms), True)(x, p))  # else byte-for-byte
            del x, p  # inputs released before waiting on the writer
            yield new

    programs = _Programs(config, transforms, bd, pre)
    try:
        stats: list = []
        for i, t in enumerate(transforms):
            stats.append(t.gather(lambda i=i: tensors_after(i)))
        for name in names:  # compiled on worker threads while the tensors before them are read and mixed
            if name in mixed:
                pipeline(name, len(transforms), True)
        with ThreadPoolExecutor(1, thread_name_prefix="bdjax-read") as reader, staged_dir(out) as tmp:
            for f in bd.files:
                entries = [(name, *f.entries[name][:2]) for name in f.keys()]
                write_stream(tmp / f.path.name, entries, arrays(f), metadata=f.metadata, direct=direct)
            for extra in backdoored.iterdir():  # config, index, tokenizer: everything but the weights
                if extra.is_file() and extra.suffix != ".safetensors" and (extra.suffix in (".json", ".jinja", ".txt")
                                                                            or extra.name == INDEX):
                    shutil.copyfile(extra, tmp / extra.name)
    finally:
        programs.close()
    return out
