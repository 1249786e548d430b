"""Run elementwise defenses on checkpoint files, one tensor at a time.

`stream_defense` reads the backdoored and pretrained HF safetensors directories through memory
maps, and for each tensor converts both to bdjax's layout, applies the transforms in order
(`bdjax.defenses.base.Elementwise`, keyed by the tensor's name exactly as in memory) and writes
the result into an output file with the same shard layout. Peak memory is a few copies of the
largest tensor, whatever the model's size; tensors no transform touches are copied byte for byte.
Statistics a transform needs (e.g. a global mixing threshold) are gathered in extra passes first.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from bdjax.checkpoints.hf import INDEX, weight_files
from bdjax.checkpoints.layout import tensor_codec, tensor_path
from bdjax.checkpoints.tensorfile import TensorFile, write_stream
from bdjax.defenses.base import Elementwise, TensorItem, tensor_key
from bdjax.errors import CheckpointError
from bdjax.io import staged_dir
from bdjax.models.config import ModelConfig


class _Tensors:
    """name -> memory-mapped tensor over every shard of an HF directory."""

    def __init__(self, path: Path):
        self.files = [TensorFile(f) for f in weight_files(path)]
        self.where = {name: f for f in self.files for name in f.keys()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.where[name].read(name)  # a copy: no file pages stay mapped (resident) after use


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


def stream_defense(transforms: Sequence[Elementwise], backdoored: str | Path, pretrained: str | Path,
                   out: str | Path, key: jax.Array) -> Path:
    """Write `transforms` (applied in order, transform i keyed by fold_in(key, i), as `chain` does)
    of the backdoored checkpoint into the HF directory `out`; it appears only when complete."""
    backdoored, pretrained, out = Path(backdoored), Path(pretrained), Path(out)
    config = ModelConfig.from_file(backdoored / "config.json")
    pre_config = ModelConfig.from_file(pretrained / "config.json")
    bd, pre = _Tensors(backdoored), _Tensors(pretrained)
    _check_pair(config, pre_config, bd, pre)
    keys = [jax.random.fold_in(key, i) for i in range(len(transforms))]
    names = [n for f in bd.files for n in f.keys()]
    compiled: dict = {}

    def pipeline(name: str, upto: int, to_file: bool):
        """One jitted function per (tensor kind, depth): both layout conversions, the transforms
        with their per-tensor keys, and the cast back to the file's dtype, fused by XLA."""
        path, layer, to_ours, to_hf = tensor_codec(config, name)
        cache_key = (path, upto, to_file)
        if cache_key not in compiled:
            def run(bd_hf, pre_hf, ks, sts, tag):
                x, p = to_ours(bd_hf), to_ours(pre_hf)
                for t, k, st in zip(transforms[:upto], ks, sts):
                    if t.touches(path):
                        x = t.fn(path, x, p, tensor_key(k, path, tag), st).astype(x.dtype)
                return to_hf(x).astype(bd_hf.dtype) if to_file else (x, p)
            compiled[cache_key] = jax.jit(run)
        tag = np.uint32(0 if layer is None else layer + 1)
        return lambda b, p: compiled[cache_key](b, p, keys[:upto], stats[:upto], tag)

    def tensors_after(upto: int) -> Iterator[TensorItem]:
        for name in names:
            path = tensor_path(config, name)
            if path is not None and transforms[upto].touches(path):  # stats see only what they act on
                x, p = pipeline(name, upto, False)(bd[name], pre[name])
                yield path, tensor_codec(config, name)[1], np.asarray(x), np.asarray(p)

    stats: list = []
    for i, t in enumerate(transforms):
        stats.append(t.gather(lambda i=i: tensors_after(i)))

    def arrays(f: TensorFile) -> Iterator[np.ndarray]:
        for name in f.keys():
            path = tensor_path(config, name)
            if path is None or not any(t.touches(path) for t in transforms):
                yield f.read(name)  # byte-for-byte
            else:
                yield np.asarray(pipeline(name, len(transforms), True)(bd[name], pre[name]))

    with staged_dir(out) as tmp:
        for f in bd.files:
            entries = [(name, *f.entries[name][:2]) for name in f.keys()]
            write_stream(tmp / f.path.name, entries, arrays(f), metadata=f.metadata)
        for extra in backdoored.iterdir():  # config, index, tokenizer: everything but the weights
            if extra.is_file() and extra.suffix != ".safetensors" and (extra.suffix in (".json", ".jinja", ".txt")
                                                                        or extra.name == INDEX):
                shutil.copyfile(extra, tmp / extra.name)
    return out
