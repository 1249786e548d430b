"""Grouped-query self-attention over rows, a KV cache, a shared prefix read at batch 1, or a
shared prefix packed with the rows into one token stream; and the masks and positions it uses."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bdjax.kernels import attention as fused_attention
from bdjax.models.config import ModelConfig
from bdjax.models.layers import Opts, Proj, rotate
from bdjax.sharding import active_devices

Array = jax.Array


class Attention(nn.Module):
    """Grouped-query self-attention. `packed` = (P, B, W): `x` is [1, P + B·W, E], a shared prefix
    of P tokens followed by B rows of W tokens laid end to end (so that every projection is one
    matmul over all of them), `mask` is (the prefix's causal mask [1, P, P], the rows' mask
    [B, W, P + W]); the prefix attends to itself, each row to the prefix and to itself."""

    config: ModelConfig
    opts: Opts = Opts()
    packed: tuple[int, int, int] | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index, summary_at=None):
        c = self.config
        e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        kw = self.opts.proj()
        bias = lambda n, axis: dict(bias_shape=(n, d), bias_axes=(axis, "head_dim")) if c.qkv_bias else {}
        q = Proj("bse,ehd->bshd", (e, h, d), ("embed", "heads", "head_dim"), **bias(h, "heads"), name="q", **kw)(x)
        kk = Proj("bse,ekd->bskd", (e, k, d), ("embed", "kv_heads", "head_dim"), **bias(k, "kv_heads"), name="k",
                  **kw)(x)
        v = Proj("bse,ekd->bskd", (e, k, d), ("embed", "kv_heads", "head_dim"), **bias(k, "kv_heads"), name="v",
                 **kw)(x)
        q, kk = rotate(q, cos, sin), rotate(kk, cos, sin)
        dtype = self.opts.dtype
        group = lambda t: t.reshape(*t.shape[:2], k, h // k, d)  # grouped-query: query heads share kv heads
        out_bias = dict(bias_shape=(e,), bias_axes=("embed",)) if c.out_bias else {}
        o_proj = Proj("bshd,hde->bse", (h, d, e), ("heads", "head_dim", "embed"), **out_bias, name="o", **kw)

        if self.packed is not None:
            p, b, w = self.packed
            prefix_mask, rows_mask = mask
            rows = lambda t: t[0, p:].reshape(b, w, *t.shape[2:])
            kp, vp = kk[:, :p], v[:, :p]  # the prefix's keys and values, read at batch 1 by every row
            out_p, _ = _attend(group(q[:, :p]), [(kp, vp, "btkd", prefix_mask)], dtype, self.opts.attention,
                               want_probs=False)
            out_r, probs = _attend(group(rows(q)), [(kp, vp, "btkd", rows_mask[:, :, :p]),
                                                    (rows(kk), rows(v), "btkd", rows_mask[:, :, p:])], dtype,
                                   self.opts.attention, want_probs=summary_at is not None)
            self._sow_concentration(probs, summary_at)
            out = jnp.concatenate([out_p.reshape(p, h, d), out_r.reshape(b * w, h, d)])[None]
            return o_proj(out), None

        b, s = x.shape[:2]
        # (keys, values, their layout, mask) per source: this call's own tokens [b, s, k, d], and
        # cached slots [b, k, t, d] (kv-head-major, so a decode step reads them without a
        # transpose). A cache may open with a shared prefix held once for the whole batch
        # ("prefix_k"/"prefix_v" [1, k, P, d], never written): the mask's first P columns are its
        # slots and `cache_index` counts the slots after it.
        shared = 0 if layer_cache is None or "prefix_k" not in layer_cache else layer_cache["prefix_k"].shape[2]
        parts = [(kk, v, "btkd", mask if layer_cache is None else
                  jax.lax.dynamic_slice_in_dim(mask, shared + cache_index, s, axis=2))]
        new_kv = None
        if layer_cache is not None:
            # The cache is read, never rewritten here: the layer returns only its new keys/values,
            # and the caller writes them into the cache in place (one small update per step
            # instead of a copy of every layer's cache). Slots before `cache_index` come from it.
            cache_dtype = layer_cache["k" if "k" in layer_cache else "prefix_k"].dtype
            new_kv = {"k": jnp.swapaxes(kk, 1, 2).astype(cache_dtype), "v": jnp.swapaxes(v, 1, 2).astype(cache_dtype)}
            # rows' cached slots (none in a prefill, or with only a shared prefix)
            if "k" in layer_cache and not (isinstance(cache_index, int) and cache_index == 0):
                cached = layer_cache["k"].shape[2]
                before = jnp.arange(cached) < cache_index
                parts.insert(0, (layer_cache["k"], layer_cache["v"], "bktd",
                                 mask[:, :, shared:shared + cached] & before[None, None, :]))
            if shared:
                parts.insert(0, (layer_cache["prefix_k"], layer_cache["prefix_v"], "bktd", mask[:, :, :shared]))
        out, probs = _attend(group(q), parts, dtype, self.opts.attention, want_probs=summary_at is not None)
        self._sow_concentration(probs, summary_at)
        return o_proj(out.reshape(b, s, h, d)), new_kv

    def _sow_concentration(self, probs, summary_at):
        if summary_at is not None:
            # Obliviate's attention-concentration term: the L2 norm of the post-softmax attention row
            # of the summarizing query (one per example), averaged over heads; only when asked for.
            row = jnp.take_along_axis(probs, summary_at[:, None, None, None, None], axis=3)[:, :, :, 0]
            norms = jnp.sqrt(jnp.sum(jnp.square(row.astype(jnp.float32)), axis=-1))  # [batch, kv_heads, group]
            self.sow("intermediates", "attn_concentration", norms.mean(axis=(1, 2)))


def _attend(qg: Array, parts: list, dtype: Any, kernel: str = "xla", want_probs: bool = True
            ) -> tuple[Array, Array | None]:
    """Attention of grouped queries qg [b, s, k, g, d] over `parts`, a list of (keys, values,
    layout, mask [b, s, t]) sources softmaxed together: the output [b, s, k, g, d] and the
    post-softmax probabilities [b, k, g, s, Σt]. With `kernel` "auto"/"fused" (`Opts.attention`),
    sources in a call's own layout ("btkd", no cache) run in the fused CPU kernel where it can (then
    no probabilities come back, so not when `want_probs`), laid side by side as one, a batch-1
    source (a packed shared prefix) copied to every row (P·k·d floats a row); XLA's ops read each
    source as it is."""
    if kernel != "xla" and not want_probs and all(kv == "btkd" for _, _, kv, _ in parts):
        b = qg.shape[0]
        wide = lambda ts: jnp.concatenate([jnp.broadcast_to(t, (b, *t.shape[1:])).astype(dtype) for t in ts], axis=1)
        keys, values = wide([part[0] for part in parts]), wide([part[1] for part in parts])
        mask = jnp.concatenate([part[3] for part in parts], axis=-1)
        if fused_attention.usable(kernel, qg, keys, values, mask, active_devices()):
            qg, keys, values = (checkpoint_name(t, n) for t, n in zip((qg, keys, values), fused_attention.INPUT_NAMES))
            return fused_attention.attention(qg, keys, values, mask), None
    d = qg.shape[-1]
    scores = [_scores(qg, keys.astype(dtype), kv).astype(jnp.float32) for keys, _, kv, _ in parts]
    scores = jnp.concatenate([jnp.where(m[:, None, None, :, :], sc / np.sqrt(d).astype(np.float32),
                                        jnp.finfo(jnp.float32).min) for sc, (_, _, _, m) in zip(scores, parts)],
                             axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out, offset = 0, 0
    for keys, values, kv, _ in parts:
        width = keys.shape[kv.index("t")]
        out = out + _weighted(probs[..., offset:offset + width], values.astype(dtype), kv)
        offset += width
    return out, probs


def _scores(q: Array, keys: Array, layout: str) -> Array:
    """Attention scores [b, k, g, s, t] of grouped queries q [b, s, k, g, d] against keys in
    `layout` ("btkd" or "bktd"); keys at batch 1 against several rows of queries are a shared
    prefix's, read by every row without a broadcast copy. A single query against a kv-head-major cache (a decode step) is
    a broadcast multiply and sum: XLA fuses it with the cache read, where a batched dot of a
    few query rows would first copy each layer's cache slice."""
    if keys.shape[0] == 1 < q.shape[0]:  # one shared prefix for every row
        return jnp.einsum(f"bskgd,{layout[1:]}->bkgst", q, keys[0])
    if q.shape[1] == 1 and layout == "bktd":
        return jnp.sum(q[:, 0, :, :, None, :] * keys[:, :, None], axis=-1)[:, :, :, None, :]
    return jnp.einsum(f"bskgd,{layout}->bkgst", q, keys)


def _weighted(probs: Array, values: Array, layout: str) -> Array:
    """Attention output [b, s, k, g, d]: probs [b, k, g, s, t] over values in `layout` (as `_scores`)."""
    if values.shape[0] == 1 < probs.shape[0]:
        return jnp.einsum(f"bkgst,{layout[1:]}->bskgd", probs, values[0])
    if probs.shape[3] == 1 and layout == "bktd":
        return jnp.sum(probs[:, :, :, 0, :, None] * values[:, :, None], axis=3)[:, None]
    return jnp.einsum(f"bkgst,{layout}->bskgd", probs, values)


def attention_mask(q_slots: Array, kv_valid: Array, sliding_window: int | None,
                   q_positions: Array | None = None, kv_positions: Array | None = None) -> Array:
    """[batch, seq, kv_len] bool: query slot i may attend key slot j iff j <= i, j is a real token,
    and (with a sliding window W) i - j < W. Slots index the sequence/cache, not RoPE positions;
    where padding sits between real tokens (a shared prefix, then left-padded rows), give their
    positions ([batch, seq] and [batch, kv_len]) and the window counts those instead."""
    k_slots = jnp.arange(kv_valid.shape[-1])
    allowed = k_slots[None, None, :] <= q_slots[..., :, None]
    if sliding_window is not None:
        if q_positions is None:
            allowed &= q_slots[..., :, None] - k_slots[None, None, :] < sliding_window
        else:
            allowed &= q_positions[:, :, None] - kv_positions[:, None, :] < sliding_window
    return allowed & kv_valid[:, None, :]


def positions_from_mask(mask: Array) -> Array:
    """RoPE positions for left-padded rows (HF's cumsum(mask) - 1, pads at 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
