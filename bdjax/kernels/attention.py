"""Fused grouped-query attention for XLA:CPU (`attention_cpu.cc`), with its hand-written backward.

XLA:CPU runs attention as separate batched products (one thread each), a masked softmax and layout
copies; at the LoRA benchmark's shapes (batch 8 x 128, 9 query and 3 kv heads of 64) that is
~0.8 s of a ~3.9 s training step on two cores, with one core idle for much of it. The kernel does a
(batch, kv head) pair's scores, softmax and weighted sum in one pass over cache-resident tiles,
pairs spread over XLA's thread pool, and skips key blocks the mask rules out. The forward returns
the output and the softmax's log-normalizer; the backward recomputes the probabilities from them
(both are tagged `SAVED_NAMES`, so a remat policy can keep them instead of re-running the forward).

`usable` decides per call whether the kernel applies; everything else keeps XLA's ops.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bdjax.errors import ConfigError
from bdjax.kernels import build

MODES = ("auto", "fused", "xla")
SAVED_NAMES = ("attention_out", "attention_lse")
INPUT_NAMES = ("attention_q", "attention_k", "attention_v")  # tagged by the caller (models/attention.py)
_FORWARD, _BACKWARD = "bdjax_attention_forward", "bdjax_attention_backward"
_registered = False
_warned = False


def available() -> bool:
    """Whether the kernel is built (or builds now) and registered with JAX. The first time it
    cannot be built or loaded (see `build.load`), a RuntimeWarning says why (attention then runs in XLA's ops)."""
    global _registered, _warned
    if _registered:
        return True
    lib = build.load("attention_cpu")
    if lib is None:
        if not _warned:
            _warned = True
            warnings.warn(f"bdjax's fused CPU attention kernel is not available, so attention runs in XLA's ops: "
                          f"{build.failure.get('attention_cpu', 'unknown reason')}", RuntimeWarning, stacklevel=2)
        return False
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.BdjaxAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.BdjaxAttentionBackward), platform="cpu")
    _registered = True
    return True


def check_mode(mode: str, what: str = "attention") -> None:
    """A ConfigError (naming the setting `what`) unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ConfigError(f"{what}={mode!r} must be one of {', '.join(MODES)}")


def unsupported(qg: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> str | None:
    """Why the kernel cannot take these operands (None if it can)."""
    if qg.ndim != 5:
        return f"queries must be [batch, seq, kv_heads, group, head_dim], got {qg.shape}"
    b, s, k, _, d = qg.shape
    if not qg.dtype == keys.dtype == values.dtype == jnp.float32:
        return f"float32 only, got {qg.dtype}/{keys.dtype}/{values.dtype}"
    if d % 16:
        return f"head_dim {d} is not a multiple of 16"
    t = keys.shape[1] if keys.ndim == 4 else -1
    if keys.shape != (b, t, k, d) or values.shape != keys.shape:
        return f"keys/values must be [batch, keys, kv_heads, head_dim] = [{b}, T, {k}, {d}], got {keys.shape}"
    if mask.shape != (b, s, t) or mask.dtype != jnp.bool_:
        return f"mask must be bool [{b}, {s}, {t}], got {mask.dtype}{list(mask.shape)}"
    return None


def usable(mode: str, qg: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
           devices: int = 1) -> bool:
    """Whether attention over these operands runs in the kernel. `auto`: on a single CPU device when
    it builds and the operands fit; `fused`: the same, but anything else is an error; `xla`: never.
    (`devices` > 1: the call is partitioned over a mesh, which a custom call cannot follow.)"""
    check_mode(mode)
    if mode == "xla":
        return False
    why = unsupported(qg, keys, values, mask)
    if why is None and jax.default_backend() != "cpu":
        why = f"the kernel runs on CPU, not {jax.default_backend()}"
    if why is None and devices > 1:
        why = f"the model is sharded over {devices} devices"
    if why is None and not available():
        why = f"the kernel is not available: {build.failure.get('attention_cpu', 'unknown reason')}"
    if why is not None and mode == "fused":
        raise ConfigError(f"attention='fused' cannot run here: {why}")
    return why is None


@jax.custom_vjp
def attention(qg: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√d masked)·v for grouped queries qg [b, s, k, g, d] against keys and values
    [b, t, k, d] under mask [b, s, t]; the output is [b, s, k, g, d]. Call `available()` first."""
    return _forward(qg, keys, values, mask)[0]


def _scale(d: int) -> np.float32:
    return np.float32(1.0 / np.sqrt(d))


def _forward(qg, keys, values, mask):
    b, s, k, g, d = qg.shape
    out, lse = jax.ffi.ffi_call(_FORWARD, (jax.ShapeDtypeStruct(qg.shape, jnp.float32),
                                           jax.ShapeDtypeStruct((b, k, g, s), jnp.float32)))(
        qg, keys, values, mask, scale=_scale(d))
    out, lse = checkpoint_name(out, SAVED_NAMES[0]), checkpoint_name(lse, SAVED_NAMES[1])
    return out, (qg, keys, values, mask, out, lse)


def _backward(res, dout):
    qg, keys, values, mask, out, lse = res
    dq, dk, dv = jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(qg.shape, jnp.float32),
                                              jax.ShapeDtypeStruct(keys.shape, jnp.float32),
                                              jax.ShapeDtypeStruct(values.shape, jnp.float32)))(
        qg, keys, values, mask, out, lse, dout.astype(jnp.float32), scale=_scale(qg.shape[-1]))
    return dq, dk, dv, None


attention.defvjp(_forward, _backward)
