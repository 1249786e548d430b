"""Fine-mixing (Zhang et al. 2022, "Fine-mixing: Mitigating Backdoors in Fine-tuned Language
Models", arXiv 2210.09545, Sec. 3.1): θ = m⊙θ_bd + (1−m)⊙θ_pre.

The keep-mask m keeps a fraction ρ (`keep`) of the backdoored weights and resets the rest to the
pretrained ones. `mode="random"`: m ~ Bernoulli(ρ) per entry (the paper's mixing). `mode="selected"`:
keep the ρ fraction of entries that moved least (|θ_bd − θ_pre| smallest) and reset those that
moved most (SANDE's Fine-mixing baseline resets the 20% most-moved entries per tensor).
`scope="tensor"` applies the ratio within each weight matrix of each layer; `scope="global"`
ranks entries across all mixed tensors at once. With a LoRA attack the two checkpoints differ only
by the merged LoRA update, so mixing touches exactly that. The paper follows mixing with re-tuning
on a little clean data (`bdjax.defenses.retune`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.defenses.base import Elementwise, TensorItem, path_filter
from bdjax.errors import ConfigError

MODES = ("random", "selected")
SCOPES = ("tensor", "global")
EMBEDDINGS = r"embedding|lm_head/kernel"


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def mask_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random bits of `shape`: Threefry-2x32 (20 rounds) in counter mode over the flat index,
    the generator `jax.random.bits` uses, written out elementwise. JAX lowers its own on CPU as a
    loop over full-size arrays (about 0.3 GB/s here); unrolled, XLA fuses it with the mixing."""
    n = math.prod(shape)
    if n >= 2**32:  # the counter would wrap
        return jax.random.bits(key, shape, jnp.uint32)
    data = jax.random.key_data(key)
    k0, k1 = data[0], data[1]
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0 = jnp.zeros(shape, jnp.uint32) + ks[0]
    x1 = jax.lax.iota(jnp.uint32, n).reshape(shape) + ks[1]
    for j in range(5):
        for r in _ROTATIONS[j % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(j + 1) % 3]
        x1 = x1 + ks[(j + 2) % 3] + np.uint32(j + 1)
    return x0 ^ x1


def _moved(bd: jax.Array, pre: jax.Array) -> jax.Array:
    return jnp.abs(bd.astype(jnp.float32) - pre.astype(jnp.float32))


def _float_bits(x: np.ndarray) -> np.ndarray:
    # Non-negative float32s order like their bit patterns read as uint32: an exact radix select.
    return np.ascontiguousarray(x, np.float32).view(np.uint32).ravel()


def least_mask(d: jax.Array, k: int) -> jax.Array:
    """True at the k smallest entries of a non-negative float32 vector, ties broken by position:
    the first k of a stable argsort, found without sorting. A radix select builds the k-th smallest
    bit pattern t from its top bit down (32 counting passes), then every entry below t is kept and
    the first k − #(below t) entries equal to t (a prefix sum). O(n): over the 30 layers of one
    SmolLM2-135M MLP kernel it takes 0.64 s here, per-layer stable argsorts 8.4 s."""
    n = d.shape[0]
    if k <= 0:
        return jnp.zeros((n,), bool)
    if k >= n:
        return jnp.ones((n,), bool)
    if n >= 2**32:  # the uint32 counts would wrap
        return jnp.zeros((n,), bool).at[jnp.argsort(d, stable=True)[:k]].set(True)
    bits = jax.lax.bitcast_convert_type(d.astype(jnp.float32), jnp.uint32)
    kk = np.uint32(k)

    def settle(i, t):  # keep bit 31 - i of t if fewer than k entries lie below the candidate
        cand = t | jnp.left_shift(np.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(bits < cand, dtype=jnp.uint32) < kk, cand, t)

    t = jax.lax.fori_loop(0, 32, settle, np.uint32(0))
    below = bits < t
    tie = bits == t
    room = kk - jnp.sum(below, dtype=jnp.uint32)
    return below | (tie & (jnp.cumsum(tie, dtype=jnp.uint32) <= room))


def global_threshold(tensors: Callable[[], Iterator[TensorItem]], keep: float) -> float:
    """The k-th smallest |θ_bd − θ_pre| over all tensors, k = round(keep · entries), found exactly
    in two streaming passes (16-bit radix histograms) without holding more than one tensor."""
    hi = np.zeros(1 << 16, np.int64)
    total = 0
    for _, _, bd, pre in tensors():
        bits = _float_bits(np.asarray(_moved(jnp.asarray(bd), jnp.asarray(pre))))
        hi += np.bincount(bits >> 16, minlength=1 << 16)
        total += bits.size
    k = max(1, int(round(keep * total)))
    cum = np.cumsum(hi)
    top = int(np.searchsorted(cum, k))  # the high half of the k-th value
    rank = k - (int(cum[top - 1]) if top else 0)
    lo = np.zeros(1 << 16, np.int64)
    for _, _, bd, pre in tensors():
        bits = _float_bits(np.asarray(_moved(jnp.asarray(bd), jnp.asarray(pre))))
        lo += np.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
    low = int(np.searchsorted(np.cumsum(lo), rank))
    return float(np.array([(top << 16) | low], np.uint32).view(np.float32)[0])


def fine_mix(keep: float, *, mode: str = "random", scope: str = "tensor", embeddings: bool = True,
             include: str = ".*", exclude: str | None = None) -> Elementwise:
    """Fine-mixing with keep ratio ρ = `keep` ∈ [0, 1]: ρ = 1 returns the backdoored weights, ρ = 0
    the pretrained ones. `embeddings=False` leaves the embedding (and an untied head) backdoored;
    `include`/`exclude` (path regexes) choose the mixed tensors."""
    if not 0.0 <= keep <= 1.0:
        raise ConfigError(f"fine_mix keep={keep} must be in [0, 1] (the fraction of backdoored weights kept)")
    if mode not in MODES:
        raise ConfigError(f"fine_mix mode={mode!r} must be one of {MODES}")
    if scope not in SCOPES:
        raise ConfigError(f"fine_mix scope={scope!r} must be one of {SCOPES}")
    chosen = path_filter(include, exclude)
    touches = lambda path: chosen(path) and (embeddings or not path_filter(EMBEDDINGS)(path))

    def fn(path, bd, pre, key, threshold):
        if keep >= 1.0:
            return bd
        if keep <= 0.0:
            return pre
        if mode == "random":
            cut = np.uint32(min(int(round(keep * 2.0**32)), 2**32 - 1))
            m = mask_bits(key, bd.shape) < cut
        elif scope == "global":
            m = _moved(bd, pre) <= threshold
        else:  # the k least-moved entries of this tensor; ties by position
            d = _moved(bd, pre)
            m = least_mask(d.ravel(), int(round(keep * d.size))).reshape(bd.shape)
        return jnp.where(m, bd, pre)

    stats = None
    if mode == "selected" and scope == "global" and 0.0 < keep < 1.0:
        stats = lambda tensors: global_threshold(tensors, keep)
    return Elementwise(f"fine_mix(keep={keep:g}, {mode}, {scope})", fn, stats, touches)
