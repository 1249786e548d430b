"""Device meshes and logical-axis sharding (MaxText's scheme, written for bdjax's pytrees).

A mesh has three named axes: `data` (pure data parallelism: params replicated), `fsdp` (data
parallelism with params, gradients and optimizer state sharded: weights are all-gathered per
layer) and `tensor` (tensor parallelism over heads and the MLP width). Sizes come from the recipe;
one may be -1, meaning "the remaining devices".

Parameters and activations carry logical axis names (`embed`, `heads`, `mlp`, `batch`, ...); the
recipe's rules map each logical name to mesh axes. A dimension whose size the mapped mesh axes do
not divide is replicated instead (e.g. SmolLM2's 3 kv heads on 2 tensor shards), as is a mesh axis
already used by another dimension of the same array.

`Placement` bundles a mesh with its rules and places host data on it: params from whole host
arrays, batches from each process's own rows (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bdjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes (a name, a tuple of names, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora_rank", None),
    ("length", None),
    ("activation_embed", None),
)

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def normalize_rules(rules: Sequence[Sequence[Any]]) -> Rules:
    """Rules as ((logical, (mesh axes...)), ...), checking every mesh axis name."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"mesh.rules entry {tuple(rule)!r} must be (logical_axis, mesh_axes)")
        logical, target = rule
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for a in axes:
            if a not in MESH_AXES:
                raise ConfigError(f"mesh.rules maps {logical!r} to unknown mesh axis {a!r}; mesh axes are "
                                  f"{', '.join(MESH_AXES)}")
        out.append((logical, axes))
    return tuple(out)


def resolve_shape(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Mesh axis sizes with a -1 filled in; the product must equal the device count."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh has unknown axes {unknown}; mesh axes are {', '.join(MESH_AXES)}")
    shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in shape.items() if s == -1]
    bad = [a for a, s in shape.items() if s == 0 or s < -1]
    described = " ".join(f"{a}={s}" for a, s in shape.items())
    if bad or len(fill) > 1:
        raise ConfigError(f"mesh {described}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape.values() if s != -1)
    if fill:
        if n_devices % known:
            raise ConfigError(f"mesh {described} does not divide the {n_devices} devices of this run")
        shape[fill[0]] = n_devices // known
    elif known != n_devices:
        raise ConfigError(f"mesh {described} needs {known} devices; this run has {n_devices}")
    return shape


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(sizes, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    if devices[0].platform == "cpu":
        grid = np.asarray(devices, dtype=object).reshape(dims)  # no topology to optimize for
    else:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(dims, devices)
    return Mesh(grid, MESH_AXES)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh) -> P:
    """PartitionSpec of an array with these logical axes: each dim gets its rule's mesh axes, minus
    those already used, of size 1, or that do not divide the dim."""
    table = dict(rules)
    used: set[str] = set()
    parts = []
    for name, size in zip(logical, shape):
        axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1]
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def active_devices() -> int:
    """How many devices the placement active during tracing spans (1 when none is active)."""
    placement = _ACTIVE.get()
    return 1 if placement is None else placement.n_devices


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axes when a placement is active (during tracing
    under `Placement.activate()`); the identity otherwise."""
    placement = _ACTIVE.get()
    if placement is None:
        return x
    return jax.lax.with_sharding_constraint(x, placement.sharding(logical, x.shape))


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and its logical-axis rules."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    @classmethod
    def create(cls, sizes: dict[str, int] | None = None, rules: Sequence[Sequence[Any]] | None = None,
               devices: Sequence[jax.Device] | None = None) -> Placement:
        """A placement over all devices (pure data parallelism unless `sizes` says otherwise)."""
        return cls(make_mesh(sizes or {"data": -1}, devices), normalize_rules(DEFAULT_RULES if rules is None
                                                                               else rules))

    @property
    def n_devices(self) -> int:
        return self.mesh.size

    @property
    def batch_shards(self) -> int:
        """How many ways a batch is split (the mesh axes that `batch` maps to)."""
        return math.prod(self.mesh.shape[a] for a in dict(self.rules).get("batch", ()))

    @property
    def can_pack_prefix(self) -> bool:
        """Whether a shared prefix may run in the rows' token stream: only if the batch is whole on
        every device, since a packed stream cannot be split over the batch axis."""
        return self.batch_shards == 1

    def sharding(self, logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, spec_for(logical, shape, self.rules, self.mesh))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self._batch_axes()))

    def _batch_axes(self):
        axes = tuple(a for a in dict(self.rules).get("batch", ()) if self.mesh.shape[a] > 1)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    def tree_shardings(self, shapes: Any, logical: Any) -> Any:
        """Shardings for a pytree of arrays/ShapeDtypeStructs from a matching tree of PartitionSpecs
        (or tuples) of logical names."""
        return jax.tree.map(lambda axes, x: self.sharding(tuple(axes), x.shape), logical, shapes,
                            is_leaf=lambda v: isinstance(v, (P, tuple)))

    def check_batch(self, batch_size: int, what: str = "train.batch_size") -> None:
        if batch_size % self.batch_shards:
            raise ConfigError(f"{what}={batch_size} is not divisible by the data-parallel size "
                              f"{self.batch_shards} (mesh data×fsdp)")

    def round_batch(self, batch_size: int) -> int:
        """The smallest multiple of the data-parallel size that is at least `batch_size`."""
        return -(-batch_size // self.batch_shards) * self.batch_shards

    # ----- placing host data -----

    def put(self, tree: Any, shardings: Any) -> Any:
        """Whole host arrays (the same on every process) onto the mesh; each process copies only
        the shards its own devices hold."""
        def one(x, s):
            x = np.asarray(x) if not isinstance(x, jax.Array) else x
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        return jax.tree.map(one, tree, shardings)

    def put_replicated(self, tree: Any) -> Any:
        return self.put(tree, jax.tree.map(lambda _: self.replicated, tree))

    def local_rows(self, global_batch: int) -> slice:
        """The rows of a global batch that this process's devices hold (and so must provide)."""
        index = self.batch_sharding().addressable_devices_indices_map((global_batch,))
        starts = [s[0].start or 0 for s in index.values()]
        stops = [global_batch if s[0].stop is None else s[0].stop for s in index.values()]
        lo, hi = min(starts), max(stops)
        if hi - lo != sum(b - a for a, b in set(zip(starts, stops))):
            raise ConfigError("this process's devices do not hold a contiguous block of the batch; "
                              "order the mesh so that each process's devices are adjacent on data×fsdp")
        return slice(lo, hi)

    def put_batch(self, local: dict[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
        """Assemble global batch arrays from this process's rows (`local_rows`)."""
        sharding = self.batch_sharding()
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_batch, *v.shape[1:]))
                for k, v in local.items()}

    def put_global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch that every process holds whole (evaluation): each process uses its own rows."""
        n = len(next(iter(batch.values())))
        rows = self.local_rows(n)
        return self.put_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, n)

    @contextlib.contextmanager
    def activate(self):
        """Within this block, traced model code pins activations by logical axes on this mesh."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def fetch(x: Any) -> Any:
    """Host numpy copies of (possibly multi-process) arrays, gathered from every process."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)
    return jax.tree.map(one, x)


_ACTIVE: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("bdjax_placement", default=None)
