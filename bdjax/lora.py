"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a second pytree beside the frozen params.

The LoRA tree mirrors the params tree at the targeted projections: for a kernel W at
`layers/attn/q/kernel` [L, E, H, D] it holds `layers/attn/q/{a: [L, r, E], b: [L, r, H, D]}` (A rank-major, as PEFT's lora_A).
The model applies it unmerged (see `bdjax.models.layers.Proj`); `merge` folds it into plain
params for export, evaluation and defenses. Targets are chosen by a regex over paths such as
"layers/attn/q" (the kernel's path without "/kernel").
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import ConfigError

Params = dict[str, Any]

# Kernel dims that the projection contracts with its input (the rest are outputs).
_IN_DIMS = {"o": 2}
ALL_PROJECTIONS = r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))"


def _kernels(params: Params, prefix: str = "") -> dict[str, Any]:
    """{"layers/attn/q": kernel, ...} for every projection kernel in the params tree."""
    out = {}
    for key, value in params.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            if "kernel" in value:
                out[path] = value["kernel"]
            out.update(_kernels({k: v for k, v in value.items() if k != "kernel"}, path))
    return out


def target_paths(params: Params, targets: str) -> list[str]:
    """Projection paths whose full match against `targets` succeeds."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ConfigError(f"lora.targets={targets!r} is not a valid regex ({e})") from None
    paths = [p for p in _kernels(params) if pattern.fullmatch(p)]
    if not paths:
        raise ConfigError(f"lora.targets={targets!r} matches no projection; paths look like "
                          f"{sorted(_kernels(params))[:4]}")
    return paths


def set_path(tree: Params, path: str, value: Any) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def leaves_with_paths(tree: Params) -> list[tuple[str, Any]]:
    """("a/b/c", leaf) for every leaf of a nested dict, in tree order."""
    return [("/".join(k.key for k in kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def get_path(tree: Params, path: str) -> Any:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _layered(path: str) -> bool:
    return path.startswith("layers/")


def init(params: Params, key: jax.Array, *, rank: int, targets: str = ALL_PROJECTIONS,
         dtype: Any = jnp.float32) -> Params:
    """A fresh LoRA tree: A ~ U(±1/sqrt(fan_in)) (PEFT's kaiming-uniform with a=√5), B = 0, so the
    adapted model starts equal to the base model."""
    if rank < 1:
        raise ConfigError(f"lora.rank={rank} must be at least 1")
    lora: Params = {}
    for i, path in enumerate(target_paths(params, targets)):
        shape = tuple(get_path(params, path + "/kernel").shape)
        lead, core = (shape[:1], shape[1:]) if _layered(path) else ((), shape)
        n_in = _IN_DIMS.get(path.split("/")[-1], 1)
        fan_in = int(np.prod(core[:n_in]))
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, rank, *core[:n_in]), dtype,
                               -1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in))
        b = jnp.zeros((*lead, rank, *core[n_in:]), dtype)
        set_path(lora, path, {"a": a, "b": b})
    return lora


def delta(a: jax.Array, b: jax.Array, layered: bool) -> jax.Array:
    """The dense update Aᵀ·B with the kernel's shape (per layer when stacked)."""
    prod = lambda a, b: jnp.tensordot(a, b, axes=((0,), (0,)))
    return jax.vmap(prod)(a, b) if layered else prod(a, b)


def merge(params: Params, lora: Params, *, alpha: float) -> Params:
    """Plain params with W + (alpha / r)·A·B folded into every targeted kernel."""
    merged = jax.tree.map(lambda x: x, params)  # a new tree; leaves are shared until replaced
    for path in lora_paths(lora):
        node = get_path(lora, path)
        kernel = get_path(params, path + "/kernel")
        scale = alpha / node["b"].shape[1 if _layered(path) else 0]
        new = kernel + (scale * delta(node["a"], node["b"], _layered(path))).astype(kernel.dtype)
        set_path(merged, path + "/kernel", new)
    return merged


def lora_paths(lora: Params, prefix: str = "") -> list[str]:
    out = []
    for key, value in lora.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict) and "a" in value:
            out.append(path)
        elif isinstance(value, dict):
            out.extend(lora_paths(value, path))
    return out


def logical_axes(lora: Params, base_axes: Params) -> Params:
    """Logical axis names of a LoRA tree from its base kernels' (`bdjax.models.llama.logical_axes`):
    A gets (layers, lora_rank, <kernel input axes>), B (layers, lora_rank, <kernel output axes>)."""
    out: Params = {}
    for path in lora_paths(lora):
        names = tuple(get_path(base_axes, path + "/kernel"))
        lead, core = (names[:1], names[1:]) if _layered(path) else ((), names)
        n_in = _IN_DIMS.get(path.split("/")[-1], 1)
        set_path(out, path, {"a": (*lead, "lora_rank", *core[:n_in]), "b": (*lead, "lora_rank", *core[n_in:])})
    return out


def num_params(lora: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))


def kernel_axes(tree: Params, base_axes: Params) -> Params:
    """Logical axes of a tree keyed by projection path whose leaves are kernel-shaped (e.g. a
    regularizer's per-kernel anchor), from the base kernels' axes."""
    out: Params = {}
    for path, _ in leaves_with_paths(tree):
        set_path(out, path, get_path(base_axes, path + "/kernel"))
    return out
