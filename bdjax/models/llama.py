"""A Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM) in flax.linen over a plain params pytree.

Layers are stacked on a leading `layers` axis and run with `nn.scan`, so every per-layer weight
is one array (convenient for sharding, LoRA and defenses, and compile time does not grow with
depth). Every parameter carries logical axis names; `logical_axes(config)` returns them.

Parameter tree (L = num_layers, E = hidden, H/K = query/kv heads, D = head_dim, M = mlp, V = vocab):

    embedding                        [V, E]        (vocab, embed)
    layers/attn_norm/scale           [L, E]        (layers, embed)
    layers/attn/{q,k,v}/kernel       [L, E, H|K, D](layers, embed, heads|kv_heads, head_dim)
    layers/attn/{q,k,v}/bias         [L, H|K, D]   (Qwen2)
    layers/attn/o/kernel             [L, H, D, E]  (layers, heads, head_dim, embed)
    layers/mlp_norm/scale            [L, E]
    layers/mlp/{gate,up}/kernel      [L, E, M]     (layers, embed, mlp)
    layers/mlp/down/kernel           [L, M, E]     (layers, mlp, embed)
    final_norm/scale                 [E]
    lm_head/kernel                   [E, V]        (absent when embeddings are tied)
    soft_prompt                      [P, E]        (optional: soft tokens, see below)

Soft prompts: when the params hold `soft_prompt` [P, E], token ids V..V+P-1 read their input
embedding from its rows instead of the vocabulary (the output head is unchanged, so soft tokens
are never predicted). A prompt-tuned or parrot prompt (SANDE) is then just token ids in a row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdjax.models.config import ModelConfig
from bdjax.sharding import constrain

Array = jax.Array
Params = dict[str, Any]

_KERNEL_INIT = nn.initializers.normal(stddev=0.02)
SOFT_PROMPT = "soft_prompt"
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


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

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(_KERNEL_INIT, self.kernel_axes),
                            self.kernel_shape, self.param_dtype)
        y = jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_shape is not None:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                              self.bias_shape, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable("lora", "a"):
            a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
            h = nn.Dropout(self.lora_dropout, deterministic=self.deterministic)(x)
            n_out = b.ndim - 1
            x2 = h.astype(self.dtype).reshape(-1, int(np.prod(a.shape[1:])))  # [tokens, in]
            d = lora_delta(self.lora_alpha / a.shape[0], x2, a.reshape(a.shape[0], -1).astype(self.dtype),
                           b.reshape(b.shape[0], -1).astype(self.dtype))
            y = y + d.reshape(*y.shape[:y.ndim - n_out], *b.shape[1:])
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lora_delta(scale: float, x: Array, a: Array, b: Array) -> Array:
    """scale·(x·Aᵀ)·B for x [T, in], A [r, in], B [r, out]: the unmerged LoRA update."""
    return scale * ((x @ a.T) @ b)


def _lora_delta_fwd(scale, x, a, b):
    low = x @ a.T
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


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
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

    def proj(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, lora_alpha=self.lora_alpha,
                    lora_dropout=self.lora_dropout, deterministic=self.deterministic)

    def norm(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


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
        q, kk = _rotate(q, cos, sin), _rotate(kk, cos, sin)
        dtype = self.opts.dtype
        group = lambda t: t.reshape(*t.shape[:2], k, h // k, d)  # grouped-query: query heads share kv heads
        out_bias = dict(bias_shape=(e,), bias_axes=("embed",)) if c.out_bias else {}
        o_proj = Proj("bshd,hde->bse", (h, d, e), ("heads", "head_dim", "embed"), **out_bias, name="o", **kw)

        if self.packed is not None:
            p, b, w = self.packed
            prefix_mask, rows_mask = mask
            rows = lambda t: t[0, p:].reshape(b, w, *t.shape[2:])
            kp, vp = kk[:, :p], v[:, :p]  # the prefix's keys and values, read at batch 1 by every row
            out_p, _ = _attend(group(q[:, :p]), [(kp, vp, "btkd", prefix_mask)], dtype)
            out_r, probs = _attend(group(rows(q)), [(kp, vp, "btkd", rows_mask[:, :, :p]),
                                                    (rows(kk), rows(v), "btkd", rows_mask[:, :, p:])], dtype)
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
        out, probs = _attend(group(q), parts, dtype)
        self._sow_concentration(probs, summary_at)
        return o_proj(out.reshape(b, s, h, d)), new_kv

    def _sow_concentration(self, probs, summary_at):
        if summary_at is not None:
            # Obliviate's attention-concentration term: the L2 norm of the post-softmax attention row
            # of the summarizing query (one per example), averaged over heads; only when asked for.
            row = jnp.take_along_axis(probs, summary_at[:, None, None, None, None], axis=3)[:, :, :, 0]
            norms = jnp.sqrt(jnp.sum(jnp.square(row.astype(jnp.float32)), axis=-1))  # [batch, kv_heads, group]
            self.sow("intermediates", "attn_concentration", norms.mean(axis=(1, 2)))


def _attend(qg: Array, parts: list, dtype: Any) -> tuple[Array, Array]:
    """Attention of grouped queries qg [b, s, k, g, d] over `parts`, a list of (keys, values,
    layout, mask [b, s, t]) sources softmaxed together: the output [b, s, k, g, d] and the
    post-softmax probabilities [b, k, g, s, Σt]."""
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


class MLP(nn.Module):
    config: ModelConfig
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x):
        e, m = self.config.hidden_size, self.config.intermediate_size
        kw = self.opts.proj()
        gate = Proj("bse,em->bsm", (e, m), ("embed", "mlp"), name="gate", **kw)(x)
        up = Proj("bse,em->bsm", (e, m), ("embed", "mlp"), name="up", **kw)(x)
        return Proj("bsm,me->bse", (m, e), ("mlp", "embed"), name="down", **kw)(nn.silu(gate) * up)


class Block(nn.Module):
    config: ModelConfig
    opts: Opts = Opts()
    packed: tuple[int, int, int] | None = None  # see Attention

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index, summary_at=None):
        eps = self.config.rms_norm_eps
        x = constrain(x, ("batch", "length", "activation_embed"))  # the residual stream: sharded by batch
        attn, new_kv = Attention(self.config, self.opts, self.packed, name="attn")(
            RMSNorm(eps, name="attn_norm", **self.opts.norm())(x), cos, sin, mask, layer_cache, cache_index,
            summary_at)
        x = x + attn
        x = x + MLP(self.config, self.opts, name="mlp")(RMSNorm(eps, name="mlp_norm", **self.opts.norm())(x))
        return x, new_kv


class Transformer(nn.Module):
    """The decoder. `__call__` returns (logits float32, new_cache or None).

    Logits are [batch, seq, vocab], or [batch, K, vocab] at the positions `logits_at` [batch, K]
    when given: the output head then runs only where a loss or a score needs it. With
    `summary_at` [batch] each layer sows, into the `intermediates` collection, the L2 norm of the
    attention row of that query position (`attn_concentration`, [layers, batch]).

    With `prefix_tokens` [P] (no cache), every row continues that shared prefix (`mask` is then
    [batch, seq, P + seq] and `positions` count from P, as `bdjax.models.rows.prefixed_rows`
    makes them). The prefix runs once, laid end to end with the rows in one [1, P + batch·seq]
    token stream, so each layer's projections are single matmuls over all of them (a separate
    pass over the prefix alone would run every weight at P rows)."""

    config: ModelConfig
    opts: Opts = Opts()
    remat: str = "none"  # a key of _REMAT_POLICIES
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, tokens, positions, mask, cache=None, cache_index=0, logits_at=None, summary_at=None,
                 update_cache=True, prefix_tokens=None):
        # tokens, positions: [batch, seq] int32; mask: [batch, seq, kv_len] bool (True = may attend).
        # With a cache, the new tokens sit at slots cache_index.. and attend to the cached slots
        # before it; `update_cache=False` reads a cache (e.g. a shared prefix) without writing it.
        c, dtype = self.config, self.opts.dtype
        embedding = self.param("embedding", nn.with_logical_partitioning(_KERNEL_INIT, ("vocab", "embed")),
                               (c.vocab_size, c.hidden_size), self.opts.param_dtype)
        packed = None
        if prefix_tokens is not None:
            if cache is not None:
                raise ValueError("prefix_tokens runs a shared prefix in the same pass; it takes no cache")
            (p,), (b, w) = prefix_tokens.shape, tokens.shape
            packed = (p, b, w)
            slots = jnp.arange(p)[None]
            mask = (attention_mask(slots, jnp.ones((1, p), jnp.bool_), c.sliding_window), mask)
            tokens = jnp.concatenate([prefix_tokens.astype(tokens.dtype), tokens.reshape(-1)])[None]
            positions = jnp.concatenate([slots, positions.reshape(1, -1)], axis=1)
        if self.has_variable("params", SOFT_PROMPT):
            x = embed_with_soft(embedding, self.get_variable("params", SOFT_PROMPT), tokens).astype(dtype)
        else:
            x = jnp.take(embedding, tokens, axis=0).astype(dtype)  # [batch, seq, embed]
        cos, sin = rope_tables(c, positions)

        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0, "lora": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=c.num_layers, unroll=self.scan_unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, new_kv = stack(c, self.opts, packed, name="layers")(x, cache, cos, sin, mask, cache_index, summary_at)
        if packed is not None:
            x = x[0, packed[0]:].reshape(packed[1], packed[2], -1)  # the rows' hidden states
        new_cache = None
        if cache is not None and update_cache and "k" in cache:  # in place in a decode loop: only the new slots
            new_cache = {**cache, **{n: jax.lax.dynamic_update_slice_in_dim(cache[n], new_kv[n], cache_index, axis=3)
                                     for n in ("k", "v")}}
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [batch, K, embed]
        x = RMSNorm(c.rms_norm_eps, name="final_norm", **self.opts.norm())(x)
        if c.tie_word_embeddings:
            logits = jnp.einsum("bse,ve->bsv", x, embedding.astype(dtype))
        else:
            logits = Proj("bse,ev->bsv", (c.hidden_size, c.vocab_size), ("embed", "vocab"), name="lm_head",
                          **self.opts.proj())(x)
        return logits.astype(jnp.float32), new_cache


def embed_with_soft(embedding: Array, soft: Array, tokens: Array) -> Array:
    """Input embeddings [batch, seq, embed] where ids >= vocab size index the soft-prompt rows."""
    vocab = embedding.shape[0]
    hard = jnp.take(embedding, jnp.minimum(tokens, vocab - 1), axis=0)
    is_soft = tokens >= vocab
    rows = jnp.take(soft, jnp.clip(tokens - vocab, 0, soft.shape[0] - 1), axis=0).astype(hard.dtype)
    return jnp.where(is_soft[..., None], rows, hard)


def soft_token_ids(config: ModelConfig, n: int) -> tuple[int, ...]:
    """The token ids that address the `n` rows of a soft prompt."""
    return tuple(range(config.vocab_size, config.vocab_size + n))


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


def init_params(config: ModelConfig, key: Array, param_dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms, zero biases) as a plain pytree."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), jnp.bool_)
    variables = Transformer(config, Opts(param_dtype=param_dtype)).init(key, tokens, tokens, mask)
    return nn.meta.unbox(variables["params"])


def logical_axes(config: ModelConfig, like: Params | None = None) -> Params:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs; with `like`, of
    the top-level entries `like` holds (a subset of the params, possibly with a soft prompt)."""
    axes = _logical_axes(config)
    if like is None:
        return axes
    axes = {**axes, SOFT_PROMPT: jax.sharding.PartitionSpec(None, "embed")}
    return {k: axes[k] for k in like}


def _logical_axes(config: ModelConfig) -> Params:
    abstract = jax.eval_shape(lambda: Transformer(config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
        jnp.ones((1, 1, 1), jnp.bool_)))
    return nn.get_partition_spec(abstract)["params"]


def param_shapes(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
