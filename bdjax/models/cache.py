"""Key/value caches: an empty decoding cache, and the keys and values of a prompt prefix that
every row of a batch shares (a chat template's system turn and instruction), computed once and
read by rows that hold only what follows it (`bdjax.models.rows`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bdjax.models.config import ModelConfig
from bdjax.models.llama import Opts, Params, Transformer, attention_mask

Array = jax.Array


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """An empty KV cache {"k", "v"} [layers, batch, kv_heads, length, head_dim]: kv-head-major, so
    attention reads each head's keys and values as contiguous [length, head_dim] matrices."""
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def prefix_kv(config: ModelConfig, params: Params, prefix: Array, *, lora: Params | None = None,
              opts: Opts = Opts(), remat: str = "none", rngs: dict[str, Array] | None = None) -> dict[str, Array]:
    """Keys and values {"k", "v"} [layers, 1, kv_heads, P, head_dim] of a prompt prefix [P] that
    every row of a batch starts with (a chat template's system turn and instruction).

    Computed once, they stand in for the prefix in every row (`apply_rows(prefix=...)`): the
    rows then hold only what follows it, so the prefix's tokens go through the model once per
    batch instead of once per row. Differentiable, so a LoRA's gradient flows through it."""
    p = prefix.shape[-1]
    tokens = prefix.reshape(1, p).astype(jnp.int32)
    slots = jnp.arange(p)[None]
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    _, kv = Transformer(config, opts, remat=remat).apply(
        variables, tokens, slots, attention_mask(slots, jnp.ones((1, p), jnp.bool_), config.sliding_window),
        init_cache(config, 1, p, opts.dtype), 0, logits_at=jnp.full((1, 1), p - 1, jnp.int32), rngs=rngs)
    return kv
