"""The model over explicit rows (training rows, scoring trees): their positions and attention
masks, plain or continuing a shared prefix whose keys and values were computed once
(`bdjax.models.cache.prefix_kv`), and their logits, optionally with a LoRA tree and Obliviate's
attention-concentration readout."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bdjax.models.config import ModelConfig
from bdjax.models.attention import attention_mask, positions_from_mask
from bdjax.models.llama import Opts, Params, Transformer

Array = jax.Array


def forward(config: ModelConfig, params: Params, tokens: Array, attention_mask_2d: Array | None = None,
            *, dtype: Any = jnp.float32, remat: str = "none") -> Array:
    """Logits [batch, seq, vocab] (float32) for tokens [batch, seq]. `attention_mask_2d` marks real
    tokens (1) and padding (0); padding may be on either side."""
    valid = jnp.ones(tokens.shape, jnp.bool_) if attention_mask_2d is None else attention_mask_2d.astype(jnp.bool_)
    positions, mask = causal_rows(config, valid)
    return apply_rows(config, params, tokens, positions, mask, opts=Opts(dtype=dtype), remat=remat)


def apply_rows(config: ModelConfig, params: Params, tokens: Array, positions: Array, mask: Array, *,
               logits_at: Array | None = None, lora: Params | None = None, opts: Opts = Opts(),
               remat: str = "none", rngs: dict[str, Array] | None = None, summary_at: Array | None = None,
               prefix: dict[str, Array] | None = None, prefix_tokens: Array | None = None):
    """Logits for explicit positions and attention mask (training rows, scoring trees), optionally
    with a LoRA tree applied unmerged and only at `logits_at` [batch, K]. With `summary_at`
    [batch] returns (logits, attention concentration [layers, batch]) instead (see Transformer).

    With `prefix` (`bdjax.models.cache.prefix_kv` of a shared prefix of P tokens), the rows
    continue it: their slots start at P, `mask` is [batch, seq, P + seq] and positions count from P
    (`prefixed_rows`). `prefix_tokens` [P] (the prefix itself, in place of its keys and values)
    runs it in the same pass as the rows, laid end to end with them (see `Transformer`)."""
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    module = Transformer(config, opts, remat=remat)
    cache_args = {} if prefix_tokens is None else {"prefix_tokens": prefix_tokens}
    if prefix is not None:  # read at batch 1 by every row (Attention: "prefix_k"/"prefix_v")
        cache_args = dict(cache={"prefix_k": prefix["k"], "prefix_v": prefix["v"]}, cache_index=0,
                          update_cache=False)
    if summary_at is None:
        logits, _ = module.apply(variables, tokens, positions, mask, logits_at=logits_at, rngs=rngs, **cache_args)
        return logits
    (logits, _), state = module.apply(variables, tokens, positions, mask, logits_at=logits_at, rngs=rngs,
                                      summary_at=summary_at, mutable=["intermediates"], **cache_args)
    (concentration,) = state["intermediates"]["layers"]["attn"]["attn_concentration"]
    return logits, concentration


def causal_rows(config: ModelConfig, valid: Array) -> tuple[Array, Array]:
    """Positions and causal mask for rows whose real tokens are marked by `valid` [batch, seq]."""
    return positions_from_mask(valid), attention_mask(jnp.arange(valid.shape[1])[None], valid,
                                                      config.sliding_window)


def prefixed_rows(config: ModelConfig, valid: Array, prefix_len: int) -> tuple[Array, Array]:
    """Positions [batch, seq] and mask [batch, seq, prefix_len + seq] for rows that continue a
    shared prefix of `prefix_len` tokens: real tokens (`valid`, padding on either side) follow it
    causally and attend to all of it."""
    positions = prefix_len + positions_from_mask(valid)
    kv_valid = jnp.concatenate([jnp.ones((valid.shape[0], prefix_len), jnp.bool_), valid.astype(jnp.bool_)], axis=1)
    kv_positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(prefix_len), (valid.shape[0], prefix_len)),
                                    positions], axis=1)
    mask = attention_mask(prefix_len + jnp.arange(valid.shape[1])[None], kv_valid, config.sliding_window,
                          positions, kv_positions)
    return positions, mask
