"""Checkpoint loading and saving: HF safetensors directories, GGUF files, the embedded default."""

from __future__ import annotations

from pathlib import Path

from bdjax.checkpoints.assets import DEFAULT_MODEL, default_model_dir
from bdjax.checkpoints.gguf import load_gguf
from bdjax.checkpoints.hf import PICKLE_SUFFIXES, load_hf_dir, refuse_pickle, save_hf_dir
from bdjax.errors import CheckpointError

NAMED = {DEFAULT_MODEL: default_model_dir}

__all__ = ["DEFAULT_MODEL", "NAMED", "load_checkpoint", "load_gguf", "load_hf_dir", "save_hf_dir"]


def load_checkpoint(name_or_path: str | Path, *, with_tokenizer: bool = True):
    """(ModelConfig, numpy params, Tokenizer or None) from a named default, an HF directory or a GGUF file."""
    name = str(name_or_path)
    if name in NAMED:
        return load_hf_dir(NAMED[name](), with_tokenizer=with_tokenizer)
    path = Path(name).expanduser()
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix == ".gguf":
        return load_gguf(path, with_tokenizer=with_tokenizer)
    if path.is_dir():
        return load_hf_dir(path, with_tokenizer=with_tokenizer)
    if path.exists():
        raise CheckpointError(f"{path} is neither a checkpoint directory nor a .gguf file")
    if _looks_like_hub_id(name):
        return load_hf_dir(_hub_snapshot(name), with_tokenizer=with_tokenizer)
    raise CheckpointError(f"checkpoint {name!r} not found: pass an HF safetensors directory, a .gguf file, "
                          f"or one of the named models {sorted(NAMED)}")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_snapshot(repo_id: str) -> Path:
    """Download only safetensors, JSON and tokenizer files of a hub repo (never code, never pickles)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local path and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:  # network errors, missing repos, auth: all one line for the user
        raise CheckpointError(f"could not fetch {repo_id!r} from the Hugging Face hub: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
