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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdjax.errors import ConfigError
from bdjax.kernels import attention as fused_attention
from bdjax.models.attention import Attention, attention_mask
from bdjax.models.config import ModelConfig
from bdjax.models.layers import KERNEL_INIT, Opts, Proj, RMSNorm, matmul, rope_tables
from bdjax.sharding import constrain

Array = jax.Array
Params = dict[str, Any]

SOFT_PROMPT = "soft_prompt"
_CP = jax.checkpoint_policies
# "dots"/"dots_no_batch" also keep the fused attention kernel's output and log-normalizer, so that
# the backward pass does not run its forward again. "lean" keeps only named values: each
# projection's output ("proj_out", LoRA included: the base and LoRA products are not kept apart),
# LoRA's rank-r activations ("lora_low"), and the fused attention kernel's inputs and outputs;
# norms, RoPE and the MLP's elementwise work are recomputed. With XLA's attention (several
# devices, or no kernel) it recomputes the score and weighting products too, so it suits the
# single-device CPU step (benchmarks/lora_step.py) rather than an accelerator.
_REMAT_POLICIES = {
    "none": None,
    "full": _CP.nothing_saveable,
    "dots": _CP.save_from_both_policies(_CP.checkpoint_dots, _CP.save_only_these_names(*fused_attention.SAVED_NAMES)),
    "dots_no_batch": _CP.save_from_both_policies(_CP.checkpoint_dots_with_no_batch_dims,
                                                 _CP.save_only_these_names(*fused_attention.SAVED_NAMES)),
    "lean": _CP.save_only_these_names("proj_out", "lora_low", *fused_attention.INPUT_NAMES, *fused_attention.SAVED_NAMES),
}


REMAT_POLICIES = tuple(_REMAT_POLICIES)


def check_remat(remat: str) -> None:
    if remat not in _REMAT_POLICIES:
        raise ConfigError(f"train.remat={remat!r} must be one of {', '.join(REMAT_POLICIES)}")


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
        embedding = self.param("embedding", nn.with_logical_partitioning(KERNEL_INIT, ("vocab", "embed")),
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
        check_remat(self.remat)
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
            logits = matmul("bse,ve->bsv", x, embedding, dtype, self.opts.matmul_dtype)
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
