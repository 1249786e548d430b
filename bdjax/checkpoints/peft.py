"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT keys look like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in])
and `...lora_B.weight` ([out, r]); bdjax's LoRA tree stacks layers and keeps heads split out
(A [L, r, in...], B [L, r, out...]), so a conversion is a reshape and a transpose per layer. The
flattened in/out orders match the HF kernel layouts of `bdjax.checkpoints.layout`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bdjax.checkpoints.hf import PICKLE_SUFFIXES, refuse_pickle
from bdjax.checkpoints.layout import _LAYER
from bdjax.checkpoints.tensorfile import TensorFile, write_file
from bdjax.errors import CheckpointError
from bdjax.io import staged_dir, write_json_atomic
from bdjax.models.config import ModelConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers"
# bdjax LoRA path under layers/ -> HF module name within a layer
_MODULES = {"/".join(path[:2]): suffix[:-len(".weight")] for suffix, (path, kind) in _LAYER.items()
            if path[-1] == "kernel"}


def _module(path: str) -> str:
    inner = path.removeprefix("layers/")
    if not path.startswith("layers/") or inner not in _MODULES:
        raise CheckpointError(f"LoRA on {path!r} has no PEFT equivalent (only per-layer projections do)")
    return _MODULES[inner]


def _lora_paths(lora: dict) -> list[str]:
    from bdjax.lora import lora_paths
    return lora_paths(lora)


def save_peft_adapter(path: str | Path, lora: dict, *, alpha: float, base_model: str = "",
                      dropout: float = 0.0) -> Path:
    """Write a PEFT LoRA adapter directory (staged: it appears whole or not at all)."""
    from bdjax.lora import get_path
    paths = _lora_paths(lora)
    rank = int(np.asarray(get_path(lora, paths[0])["a"]).shape[1])
    tensors = []
    for p in paths:
        a, b = (np.asarray(get_path(lora, p)[k], np.float32) for k in ("a", "b"))
        module = _module(p)
        for layer in range(a.shape[0]):
            name = f"{_PREFIX}.{layer}.{module}"
            tensors.append((f"{name}.lora_A.weight", np.ascontiguousarray(a[layer].reshape(rank, -1))))
            tensors.append((f"{name}.lora_B.weight", np.ascontiguousarray(b[layer].reshape(rank, -1).T)))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "target_modules": sorted({_module(p).split(".")[-1] for p in paths}),
              "base_model_name_or_path": base_model}
    with staged_dir(path) as out:
        write_file(Path(out) / WEIGHTS, tensors, metadata={"format": "pt"})
        write_json_atomic(Path(out) / CONFIG, config)
    return Path(path)


def load_peft_adapter(path: str | Path, config: ModelConfig) -> tuple[dict, float]:
    """(bdjax LoRA tree, alpha) from a PEFT adapter directory for a model of `config`."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter directory (no {CONFIG})")
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not (path / WEIGHTS).is_file():
        if pickles:
            refuse_pickle(pickles[0])
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    try:
        meta = json.loads((path / CONFIG).read_text())
        rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path / CONFIG} is not a valid LoRA adapter config") from None
    if meta.get("peft_type", "LORA") != "LORA" or meta.get("use_dora") or meta.get("use_rslora"):
        raise CheckpointError(f"{path}: only plain LoRA adapters are supported (not DoRA / rsLoRA / other types)")
    from bdjax.lora import set_path
    from bdjax.models.llama import param_shapes
    kernels = param_shapes(config)["layers"]
    by_module = {v: k for k, v in _MODULES.items()}
    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    f = TensorFile(path / WEIGHTS)
    for name in f.keys():
        parts = name.split(".")
        try:
            layer, module, which = int(parts[4]), ".".join(parts[5:7]), parts[7]
            inner = by_module[module]
        except (IndexError, ValueError, KeyError):
            raise CheckpointError(f"{path / WEIGHTS}: unexpected tensor {name!r}") from None
        if not name.startswith(_PREFIX + ".") or which not in ("lora_A", "lora_B") or layer >= config.num_layers:
            raise CheckpointError(f"{path / WEIGHTS}: unexpected tensor {name!r}")
        found.setdefault(inner, {}).setdefault(which, {})[layer] = f.tensor(name)
    lora: dict = {}
    for inner, ab in found.items():
        group, proj = inner.split("/")
        shape = kernels[group][proj]["kernel"].shape[1:]
        n_in = 2 if proj == "o" else 1
        try:
            a = np.stack([ab["lora_A"][i].reshape(rank, *shape[:n_in]) for i in range(config.num_layers)])
            b = np.stack([ab["lora_B"][i].T.reshape(rank, *shape[n_in:]) for i in range(config.num_layers)])
        except (KeyError, ValueError):
            raise CheckpointError(f"{path}: the {inner} adapter does not cover every layer with rank {rank} "
                                  f"and this model's shapes") from None
        set_path(lora, f"layers/{inner}", {"a": a.astype(np.float32), "b": b.astype(np.float32)})
    if not lora:
        raise CheckpointError(f"{path / WEIGHTS} holds no LoRA tensors")
    return lora, alpha
