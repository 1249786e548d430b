"""The shape every defense has: a pure transform `t(params, *, pretrained, key) -> params`.

Transforms compose like optax transformations (`chain`) and can be restricted to part of the tree
by a path regex (`masked`). They never read globals or files and never modify their inputs.

Elementwise transforms (`Elementwise`: fine-mixing, embedding purification) map each *tensor* on
its own — one weight matrix of one layer — given the backdoored and the pretrained tensor, a key
derived from the tensor's name, and optional statistics gathered in passes over all tensors
beforehand. That shape is what lets `bdjax.checkpoints.stream` clean a checkpoint file tensor by
tensor with peak memory independent of the model's size, with the same result as the in-memory
transform. Paths name tensors as in the params tree ("embedding", "layers/attn/q/kernel", ...);
a stacked per-layer leaf holds one tensor per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import CheckpointError, ConfigError
from bdjax.lora import leaves_with_paths, set_path

Params = dict[str, Any]
# (path, layer index or None, backdoored tensor, pretrained tensor)
TensorItem = tuple[str, int | None, Any, Any]


class Transform(Protocol):
    def __call__(self, params: Params, *, pretrained: Params, key: jax.Array) -> Params: ...


def check_compatible(params: Params, pretrained: Params) -> None:
    """Same tree, same shapes: a defense mixes two checkpoints of one architecture."""
    a, b = dict(leaves_with_paths(params)), dict(leaves_with_paths(pretrained))
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise CheckpointError(f"the backdoored and pretrained checkpoints hold different tensors (e.g. {only[:3]}); "
                              "they are not the same architecture")
    for path, x in a.items():
        if tuple(x.shape) != tuple(b[path].shape):
            what = "a vocabulary mismatch" if path in ("embedding", "lm_head/kernel") else "not the same architecture"
            raise CheckpointError(f"{path} has shape {tuple(x.shape)} in the backdoored checkpoint but "
                                  f"{tuple(b[path].shape)} in the pretrained one: {what}")


def layered(path: str) -> bool:
    return path.startswith("layers/")


def iter_tensors(params: Params, pretrained: Params) -> Iterator[TensorItem]:
    """(path, layer, backdoored, pretrained) for every tensor, stacked leaves split by layer."""
    pre = dict(leaves_with_paths(pretrained))
    for path, x in leaves_with_paths(params):
        if layered(path):
            for i in range(x.shape[0]):
                yield path, i, x[i], pre[path][i]
        else:
            yield path, None, x, pre[path]


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """A transform that maps every tensor independently: `fn(path, bd, pre, key, stats) -> new`.

    `stats(tensors) -> stats`, when given, sees `tensors()` (a fresh iterator of `TensorItem`s
    on each call, so it may make several passes) before any tensor is mapped. `touches(path)`
    says which tensors the transform may change (the others stream through untouched)."""

    name: str
    fn: Callable[[str, jax.Array, jax.Array, jax.Array, Any], jax.Array]
    stats: Callable[[Callable[[], Iterator[TensorItem]]], Any] | None = None
    touches: Callable[[str], bool] = lambda path: True

    def gather(self, tensors: Callable[[], Iterator[TensorItem]]) -> Any:
        if self.stats is None:
            return None
        return self.stats(lambda: (t for t in tensors() if self.touches(t[0])))

    def __call__(self, params: Params, *, pretrained: Params, key: jax.Array) -> Params:
        check_compatible(params, pretrained)
        stats = self.gather(lambda: iter_tensors(params, pretrained))
        pre = dict(leaves_with_paths(pretrained))
        out: Params = {}
        for path, x in leaves_with_paths(params):
            if not self.touches(path):
                new = x
            elif layered(path):
                tags = jnp.arange(1, x.shape[0] + 1, dtype=jnp.uint32)
                new = _compiled(self, path, True)(jnp.asarray(x), jnp.asarray(pre[path]), key, stats, tags)
            else:
                new = _compiled(self, path, False)(jnp.asarray(x), jnp.asarray(pre[path]), key, stats, jnp.uint32(0))
            set_path(out, path, new)
        return out


def path_crc(path: str) -> int:
    return zlib.crc32(path.encode())


def tensor_key(key: jax.Array, path: str, tag) -> jax.Array:
    """The key of one tensor: from its path and tag (layer + 1, or 0 for an unstacked tensor)."""
    return tensor_key_from_crc(key, path_crc(path), tag)


def tensor_key_from_crc(key: jax.Array, crc, tag) -> jax.Array:
    """`tensor_key` with the path given as its CRC-32, which may be a traced value."""
    return jax.random.fold_in(jax.random.fold_in(key, crc), tag)


@functools.cache
def _compiled(t: Elementwise, path: str, stacked: bool) -> Callable:
    """`t.fn` jitted for one tensor path (vmapped over layers when `stacked`): dispatching it op by
    op, layer by layer, costs more than the arithmetic. The tensor's key is derived inside, from
    its name and layer (tag = layer + 1, 0 for unstacked), the same in memory and streamed."""
    def one(bd, pre, key, stats, tag):
        return t.fn(path, bd, pre, tensor_key(key, path, tag), stats).astype(bd.dtype)
    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, 0)) if stacked else one)


@dataclasses.dataclass(frozen=True)
class Chain:
    """Apply transforms in order; transform i gets `fold_in(key, i)`."""

    transforms: tuple[Transform, ...]

    def __call__(self, params: Params, *, pretrained: Params, key: jax.Array) -> Params:
        for i, t in enumerate(self.transforms):
            params = t(params, pretrained=pretrained, key=jax.random.fold_in(key, i))
        return params

    @property
    def elementwise(self) -> bool:
        return all(isinstance(t, Elementwise) for t in self.transforms)


def chain(*transforms: Transform) -> Chain:
    """Compose defenses, first to last, like `optax.chain`."""
    flat: list[Transform] = []
    for t in transforms:
        flat.extend(t.transforms if isinstance(t, Chain) else (t,))
    return Chain(tuple(flat))


def path_filter(include: str = ".*", exclude: str | None = None) -> Callable[[str], bool]:
    try:
        inc, exc = re.compile(include), re.compile(exclude) if exclude else None
    except re.error as e:
        raise ConfigError(f"defense path pattern {include!r}/{exclude!r} is not a valid regex ({e})") from None
    return lambda path: bool(inc.fullmatch(path)) and not (exc and exc.fullmatch(path))


def masked(transform: Transform, include: str = ".*", exclude: str | None = None) -> Transform:
    """Restrict `transform` to the tensors whose path fully matches `include` and not `exclude`
    (like `optax.masked`); the others keep their backdoored values."""
    keep = path_filter(include, exclude)
    if isinstance(transform, Elementwise):
        inner = transform.touches
        return dataclasses.replace(transform, name=f"masked({transform.name})",
                                   touches=lambda path: keep(path) and inner(path))

    def apply(params: Params, *, pretrained: Params, key: jax.Array) -> Params:
        new = dict(leaves_with_paths(transform(params, pretrained=pretrained, key=key)))
        out: Params = {}
        for path, x in leaves_with_paths(params):
            set_path(out, path, new[path] if keep(path) else x)
        return out
    return apply


def as_numpy(tree: Params) -> Params:
    return jax.tree.map(np.asarray, tree)
