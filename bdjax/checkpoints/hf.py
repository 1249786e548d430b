"""Hugging Face checkpoint directories: config.json + safetensors shard(s) + tokenizer files.

Loading reads tensor by tensor from memory maps; saving writes tensor by tensor into shards of
at most `max_shard_bytes`, into a temporary directory renamed into place only when complete.
Pickled weights (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bdjax.checkpoints.layout import assemble, disassemble
from bdjax.checkpoints.tensorfile import iter_files, write_file
from bdjax.errors import CheckpointError
from bdjax.io import staged_dir
from bdjax.models.config import ModelConfig
from bdjax.tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX = "model.safetensors.index.json"


def refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path} is a pickle checkpoint; bdjax never unpickles untrusted files. Convert it to safetensors "
        "where you trust it (e.g. transformers' model.save_pretrained(dir, safe_serialization=True)) and "
        "pass that directory")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory, in index order when there is an index."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{path / INDEX} is not a valid safetensors index") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        if any(Path(f).name != f for f in weight_map.values()):
            raise CheckpointError(f"{path / INDEX} names shard files outside the checkpoint directory")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) {missing} listed in {INDEX} are missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    return files


def load_hf_dir(path: str | Path, *, with_tokenizer: bool = True):
    """(ModelConfig, params as numpy arrays, Tokenizer or None) from an HF checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_file(path / "config.json")
    params = assemble(config, iter_files(weight_files(path)), source=str(path))
    tokenizer = Tokenizer.from_dir(path) if with_tokenizer and (path / "tokenizer.json").is_file() else None
    return config, params, tokenizer


def save_hf_dir(path: str | Path, config: ModelConfig, params: dict, tokenizer: Tokenizer | None = None,
                *, max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write an HF checkpoint directory that transformers' `from_pretrained` reads.

    The directory appears atomically: it is written under a temporary name and renamed."""
    path = Path(path)
    with staged_dir(path) as tmp:
        shards: list[list[tuple[str, np.ndarray]]] = [[]]
        size = 0
        for name, arr in disassemble(config, params):
            nbytes = arr.size * arr.dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, arr))
            size += nbytes
        hf = config.to_hf()
        hf["torch_dtype"] = str(shards[0][0][1].dtype) if shards[0] else "float32"
        if tokenizer is not None:
            hf.update({k: v for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                                         ("pad_token_id", tokenizer.pad_id)) if v is not None})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if len(shards) == 1:
            write_file(tmp / "model.safetensors", shards[0])
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_file(tmp / fname, shard)
                for name, arr in shard:
                    weight_map[name] = fname
                    total += arr.size * arr.dtype.itemsize
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
            gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                   "pad_token_id": tokenizer.pad_id}
            (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
    return path
