"""The building blocks of the decoder: a linear map with an optional unmerged LoRA (and its
hand-written backward), RMSNorm, rotary position tables, and the run-time options every layer
shares."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bdjax.models.config import ModelConfig
from bdjax.sharding import active_devices

Array = jax.Array

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


class Proj(nn.Module):
    """A linear map written as an einsum over named axes, with an optional bias and LoRA.

    LoRA (Hu et al. 2021) lives in a separate variable collection `lora` ({"a", "b"}) and is applied
    unmerged, y = x·W + (alpha/r)·(drop(x)·Aᵀ)·B, so that differentiating with respect to the
    `lora` collection alone never forms a gradient of the frozen kernel."""

    spec: str  # einsum from input to output, e.g. "bse,ehd->bshd"
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_shape: tuple[int, ...] | None = None
    bias_axes: tuple[str, ...] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    matmul_dtype: Any = None  # operands of the kernel's product (None: `dtype`); see `mixed_einsum`
    lora_side_by_side: bool = False  # see Opts

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(KERNEL_INIT, self.kernel_axes),
                            self.kernel_shape, self.param_dtype)
        lora = self.has_variable("lora", "a")
        merge = lora and self._merge(x)
        if merge:
            scale, x2, a, b, unflatten = self._lora_operands(x)
            w = kernel.astype(self.dtype).reshape(x2.shape[1], -1)
            y = unflatten(lora_merged(scale, self.lora_side_by_side and active_devices() <= 1, x2, w, a, b))
        else:
            y = matmul(self.spec, x.astype(self.dtype), kernel, self.dtype, self.matmul_dtype)
        if self.bias_shape is not None:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                              self.bias_shape, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if lora and not merge:
            h = nn.Dropout(self.lora_dropout, deterministic=self.deterministic)(x)
            scale, h2, a, b, unflatten = self._lora_operands(h)
            y = y + unflatten(lora_delta(scale, h2, a, b))
        return checkpoint_name(y, "proj_out")

    def _lora_operands(self, x: Array):
        """LoRA's scale, x as [tokens, in], A [r, in] and B [r, out] in `dtype`, and the map of a
        [tokens, out] result back to x's leading axes and the output's."""
        a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
        lead = x.shape[:x.ndim - (a.ndim - 1)]
        unflatten = lambda t: t.reshape(*lead, *b.shape[1:])
        return (self.lora_alpha / a.shape[0], x.astype(self.dtype).reshape(-1, int(np.prod(a.shape[1:]))),
                a.reshape(a.shape[0], -1).astype(self.dtype), b.reshape(b.shape[0], -1).astype(self.dtype), unflatten)

    def _merge(self, x: Array) -> bool:
        """Whether LoRA runs merged into the kernel for this call (`lora_merged`): float32 products
        only (a bfloat16 W + ΔW would round most of a small ΔW away), no dropout on the LoRA branch
        (it applies to that branch alone), and enough tokens that the rank-r work on activations,
        T·(in + out), outweighs forming ΔW, in·out."""
        if jnp.dtype(self.dtype) != jnp.float32 or jnp.dtype(self.matmul_dtype or self.dtype) != jnp.float32:
            return False
        if self.lora_dropout > 0 and not self.deterministic:
            return False
        n_in = len(self.kernel_shape) - len(self.get_variable("lora", "b").shape[1:])
        fan_in, fan_out = int(np.prod(self.kernel_shape[:n_in])), int(np.prod(self.kernel_shape[n_in:]))
        tokens = int(np.prod(x.shape[:x.ndim - n_in]))
        return tokens * (fan_in + fan_out) >= fan_in * fan_out


def matmul(spec: str, x: Array, w: Array, dtype: Any, matmul_dtype: Any = None) -> Array:
    """einsum(spec, x, w) in `dtype`, or with operands rounded to `matmul_dtype` and float32
    accumulation where that differs (`mixed_einsum`)."""
    if matmul_dtype is None or jnp.dtype(matmul_dtype) == jnp.dtype(dtype):
        return jnp.einsum(spec, x, w.astype(dtype))
    return mixed_einsum(spec, jnp.dtype(matmul_dtype), x, w).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def mixed_einsum(spec: str, low: Any, x: Array, w: Array) -> Array:
    """einsum(spec, x, w) with both operands rounded to `low` (e.g. bfloat16) and products summed in
    float32, forward and backward. On CPUs with bf16 dot instructions (AVX512-BF16), XLA runs such
    products about twice as fast as float32 ones, but only with a float32 result: autodiff's
    transpose of this product would multiply in float32 (the cotangent is float32) or emit a
    bfloat16 result, so both gradient products are written out here, each one a low-precision
    product with a float32 result. Each index of a projection's spec occurs in two of its three
    terms, so the gradients are the same einsum with the terms swapped."""
    return jnp.einsum(spec, x.astype(low), w.astype(low), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(spec, low, x, w):
    xl, wl = x.astype(low), w.astype(low)
    # empty arrays carry the input dtypes through the residuals (a dtype itself is not a JAX type)
    return jnp.einsum(spec, xl, wl, preferred_element_type=jnp.float32), (xl, wl, x[:0], w[:0])


def _mixed_einsum_bwd(spec, low, res, g):
    xl, wl, x0, w0 = res
    ins, out = spec.split("->")
    lhs, rhs = ins.split(",")
    gl = g.astype(low)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", gl, wl, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", xl, gl, preferred_element_type=jnp.float32)  # dead code for a frozen w
    return dx.astype(x0.dtype), dw.astype(w0.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lora_delta(scale: float, x: Array, a: Array, b: Array) -> Array:
    """scale·(x·Aᵀ)·B for x [T, in], A [r, in], B [r, out]: the unmerged LoRA update."""
    return scale * ((x @ a.T) @ b)


def _lora_delta_fwd(scale, x, a, b):
    low = checkpoint_name(x @ a.T, "lora_low")
    return scale * (low @ b), (x, a, b, low)


def _lora_delta_bwd(scale, res, g):
    # Every product is written as a plain [m, k]·[k, n] GEMM with the large operand in its natural
    # layout. Left to autodiff, XLA's CPU backend contracts over the token axis of both operands and
    # materializes a transposed (and elementwise-recomputed) copy of the [T, in] activation in every
    # layer: 1 s of a 4 s step for SmolLM2-135M. The barriers keep the small [r, T] transposes
    # materialized so that XLA cannot fold them back into the big operand.
    x, a, b, low = res
    dlow = scale * (g @ b.T)  # [T, r]
    low_t, dlow_t = jax.lax.optimization_barrier((low.T, dlow.T))  # [r, T] each
    return dlow @ a, dlow_t @ x, scale * (low_t @ g)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def lora_merged(scale: float, side_by_side: bool, x: Array, w: Array, a: Array, b: Array) -> Array:
    """x·(W + scale·AᵀB) for x [T, in], W [in, out], A [r, in], B [r, out]: LoRA merged into the
    kernel for the call, so that no [T, out] LoRA product is added to the output and no [T, in]
    one to dx. The gradients of A and B take the low-rank route (as `lora_delta`'s), never a
    [in, out] gradient of ΔW; the merged kernel is formed again in the backward rather than kept.

    With `side_by_side` (unsharded weights: the concatenations would reshard sharded ones), the
    rank-r products that read x or g alone ride along in the big GEMMs: the forward is
    x·[W + scale·AᵀB | Aᵀ], whose last r columns are x·Aᵀ (kept for B's gradient), and the
    backward's g·[W + scale·AᵀB ; scale·B]ᵀ, whose last r columns are scale·g·Bᵀ (for A's)."""
    return x @ (w + scale * (a.T @ b))


def _lora_merged_fwd(scale, side_by_side, x, w, a, b):
    merged = w + scale * (a.T @ b)
    if not side_by_side:
        return x @ merged, (x, w, a, b, checkpoint_name(x @ a.T, "lora_low"))
    out = w.shape[1]
    z = x @ jnp.concatenate([merged, a.T], axis=1)
    return z[:, :out], (x, w, a, b, checkpoint_name(z[:, out:], "lora_low"))


def _lora_merged_bwd(scale, side_by_side, res, g):
    x, w, a, b, low = res
    merged = w + scale * (a.T @ b)
    if side_by_side:
        n = w.shape[0]
        z = g @ jnp.concatenate([merged, scale * b], axis=0).T
        dx, dlow = z[:, :n], z[:, n:]
    else:
        dx, dlow = g @ merged.T, scale * (g @ b.T)  # dlow [T, r]
    low_t, dlow_t = jax.lax.optimization_barrier((low.T, dlow.T))  # see _lora_delta_bwd
    dw = x.T @ g  # dead code for a frozen w
    return dx, dw, dlow_t @ x, scale * (low_t @ g)


lora_merged.defvjp(_lora_merged_fwd, _lora_merged_bwd)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_tables(config: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos, sin of shape [batch, seq, head_dim // 2] in float32 for integer positions [batch, seq]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(config.inv_freq())[None, None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    # HF's "rotate_half" layout: the two halves of head_dim are the real and imaginary parts.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Opts:
    """Run-time options shared by every layer (hashable: a Flax module attribute)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    # Operands of the weight products (projections and the tied output head), e.g. bfloat16 with
    # float32 accumulation while activations, norms, attention and LoRA stay in `dtype`; None: `dtype`.
    matmul_dtype: Any = None
    # Attention over a call's own keys (a packed shared prefix's included): "auto" runs it in
    # bdjax's fused CPU kernel where that applies (CPU, one device, float32;
    # bdjax/kernels/attention.py), "fused" insists on it, "xla" keeps XLA's ops.
    attention: str = "auto"
    # Where LoRA runs merged into a kernel (`lora_merged`, one device), also carry its rank-r
    # products in the big GEMMs' extra columns. Measured on the LoRA step (benchmarks/lora_step.py):
    # 2.7% faster on a Zen 4 CPU, 5-8% slower on a Zen 5 (whose GEMMs are twice as fast, so the
    # concatenated weight copies weigh more), hence off by default.
    lora_side_by_side: bool = False

    def proj(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, lora_alpha=self.lora_alpha,
                    lora_dropout=self.lora_dropout, deterministic=self.deterministic, matmul_dtype=self.matmul_dtype,
                    lora_side_by_side=self.lora_side_by_side)

    def norm(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)
