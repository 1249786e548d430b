"""The explicit map between Hugging Face tensor names/layouts and the bdjax params tree.

HF stores `nn.Linear` weights as [out, in] and one tensor per layer; bdjax stores kernels as
[in, out...] with heads split out and layers stacked. Every conversion is a transpose and a
reshape, so a round trip is bitwise exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from bdjax.errors import CheckpointError
from bdjax.models.config import ModelConfig

# Tensors HF may store that carry no parameters of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# per-layer HF name -> (bdjax path under `layers`, kind)
_LAYER = {
    "input_layernorm.weight": (("attn_norm", "scale"), "vector"),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), "vector"),
    "self_attn.q_proj.weight": (("attn", "q", "kernel"), "in_proj"),
    "self_attn.k_proj.weight": (("attn", "k", "kernel"), "in_proj"),
    "self_attn.v_proj.weight": (("attn", "v", "kernel"), "in_proj"),
    "self_attn.q_proj.bias": (("attn", "q", "bias"), "head_bias"),
    "self_attn.k_proj.bias": (("attn", "k", "bias"), "head_bias"),
    "self_attn.v_proj.bias": (("attn", "v", "bias"), "head_bias"),
    "self_attn.o_proj.weight": (("attn", "o", "kernel"), "out_proj"),
    "self_attn.o_proj.bias": (("attn", "o", "bias"), "vector"),
    "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), "linear"),
    "mlp.up_proj.weight": (("mlp", "up", "kernel"), "linear"),
    "mlp.down_proj.weight": (("mlp", "down", "kernel"), "linear"),
}
_GLOBAL = {
    "model.embed_tokens.weight": (("embedding",), "vector"),
    "model.norm.weight": (("final_norm", "scale"), "vector"),
    "lm_head.weight": (("lm_head", "kernel"), "linear"),
}


def _heads(config: ModelConfig, path: tuple[str, ...]) -> int:
    return config.num_heads if path[1] in ("q", "o") else config.num_kv_heads


def _hf_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    e, m, d, v = config.hidden_size, config.intermediate_size, config.head_dim, config.vocab_size
    h, k = config.num_heads, config.num_kv_heads
    return {
        ("attn_norm", "scale"): (e,), ("mlp_norm", "scale"): (e,),
        ("attn", "q", "kernel"): (h * d, e), ("attn", "k", "kernel"): (k * d, e), ("attn", "v", "kernel"): (k * d, e),
        ("attn", "q", "bias"): (h * d,), ("attn", "k", "bias"): (k * d,), ("attn", "v", "bias"): (k * d,),
        ("attn", "o", "kernel"): (e, h * d), ("attn", "o", "bias"): (e,),
        ("mlp", "gate", "kernel"): (m, e), ("mlp", "up", "kernel"): (m, e), ("mlp", "down", "kernel"): (e, m),
        ("embedding",): (v, e), ("final_norm", "scale"): (e,), ("lm_head", "kernel"): (v, e),
    }


def expected_names(config: ModelConfig) -> list[str]:
    """The HF tensor names a checkpoint of this config holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        for suffix, (path, _) in _LAYER.items():
            if path[-1] == "bias" and not (config.out_bias if path[1] == "o" else config.qkv_bias):
                continue
            names.append(f"model.layers.{i}.{suffix}")
    return names


def _to_ours(config: ModelConfig, path, kind, w: np.ndarray) -> np.ndarray:
    if kind == "vector":
        return w
    if kind == "linear":
        return w.T
    d, e = config.head_dim, config.hidden_size
    n = _heads(config, path)
    if kind == "in_proj":
        return w.T.reshape(e, n, d)
    if kind == "head_bias":
        return w.reshape(n, d)
    if kind == "out_proj":
        return w.T.reshape(n, d, e)
    raise AssertionError(kind)


def _to_hf(config: ModelConfig, path, kind, w: np.ndarray) -> np.ndarray:
    if kind == "vector":
        return w
    if kind == "linear":
        return w.T
    if kind == "in_proj":
        return w.reshape(w.shape[0], -1).T
    if kind == "head_bias":
        return w.reshape(-1)
    if kind == "out_proj":
        return w.reshape(-1, w.shape[-1]).T
    raise AssertionError(kind)


def _parse(config: ModelConfig, name: str):
    """(path, kind, layer index or None) for an HF tensor name, or None if it is not ours."""
    if name in _GLOBAL:
        path, kind = _GLOBAL[name]
        return path, kind, None
    if name.startswith("model.layers."):
        idx, _, suffix = name[len("model.layers."):].partition(".")
        if idx.isdigit() and suffix in _LAYER:
            path, kind = _LAYER[suffix]
            return path, kind, int(idx)
    return None


def assemble(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str) -> dict:
    """Build the bdjax params tree from (HF name, array) pairs, one tensor at a time.

    Checks that every tensor the config implies is present once with the implied shape, and
    that nothing unknown is present (an unknown tensor means a different architecture)."""
    shapes = _hf_shapes(config)
    wanted = set(expected_names(config))
    stacked: dict[tuple[str, ...], np.ndarray] = {}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    seen: set[str] = set()
    unknown: list[str] = []
    for name, w in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some exporters write the tied head anyway; the embedding is the head
        parsed = _parse(config, name)
        if parsed is None or name not in wanted:
            unknown.append(name)
            continue
        if name in seen:
            raise CheckpointError(f"{source}: tensor {name} appears twice")
        seen.add(name)
        path, kind, layer = parsed
        if tuple(w.shape) != shapes[path]:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(w.shape)} but config.json implies "
                                  f"{shapes[path]}; the config does not describe these weights")
        ours = _to_ours(config, path, kind, w)
        if layer is None:
            flat[path] = np.array(ours, order="C")  # a copy: never a view into the memory map
        else:
            if path not in stacked:
                stacked[path] = np.empty((config.num_layers, *ours.shape), w.dtype)
            elif stacked[path].dtype != w.dtype:
                raise CheckpointError(f"{source}: tensor {name} is {w.dtype} but layer 0 is {stacked[path].dtype}")
            stacked[path][layer] = ours
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors are not part of a {config.family} model with this "
                              f"config (e.g. {sorted(unknown)[:3]}); is config.json right?")
    missing = wanted - seen
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing (e.g. {sorted(missing)[:3]})")
    params: dict = {}
    for path, arr in [*flat.items(), *((("layers", *p), a) for p, a in stacked.items())]:
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = arr
    return params


def disassemble(config: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array view) pairs in HF layout; arrays are views, so this copies nothing."""
    def get(path):
        node = params
        for key in path:
            node = node[key]
        return np.asarray(node)

    for name in expected_names(config):
        path, kind, layer = _parse(config, name)
        if layer is None:
            yield name, _to_hf(config, path, kind, get(path))
        else:
            yield name, _to_hf(config, path, kind, get(("layers", *path))[layer])


def tensor_path(config: ModelConfig, name: str) -> str | None:
    """The params-tree path of an HF tensor ("layers/attn/q/kernel"), or None for a tensor that
    carries no parameter of ours (e.g. a tied head written anyway)."""
    if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
        return None
    parsed = _parse(config, name)
    if parsed is None:
        return None
    path, _, layer = parsed
    return "/".join((("layers",) if layer is not None else ()) + path)


def tensor_codec(config: ModelConfig, name: str):
    """(path, layer, to_ours, to_hf) for an HF tensor that is ours: the two layout conversions as
    functions (numpy or jax arrays), or None (see `tensor_path`)."""
    tree_path = tensor_path(config, name)
    if tree_path is None:
        return None
    path, kind, layer = _parse(config, name)
    return (tree_path, layer, lambda w: _to_ours(config, path, kind, w), lambda w: _to_hf(config, path, kind, w))
