"""E-PUR, embedding purification (Zhang et al. 2022, arXiv 2210.09545, Sec. 3.2).

A trigger is a rare token whose embedding the backdoored fine-tune moved far. For each vocabulary
row k, δ_k = ‖E_bd[k] − E_pre[k]‖₂ and f_k = its frequency in clean data; rows are ranked by
δ_k / log(max(f_k, c)) — frequent words legitimately move more — and the top-K rows are reset to
the pretrained embedding. Meaningful only when the attack changed the embeddings (full fine-tuning).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.data.assemble import prompt_segments
from bdjax.defenses.base import Elementwise
from bdjax.errors import ConfigError


def token_counts(pieces: dict[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the prompts (template and text) of tokenized pieces."""
    counts = np.zeros(vocab_size, np.int64)
    for ids, lens in prompt_segments(pieces):
        ids, lens = np.asarray(ids), np.asarray(lens)
        real = np.arange(ids.shape[1])[None, :] < lens[:, None]
        counts += np.bincount(ids[real].ravel(), minlength=vocab_size)[:vocab_size]
    return counts


def embedding_scores(bd: jax.Array, pre: jax.Array, counts: jax.Array, floor: float) -> jax.Array:
    """δ_k / log(max(f_k, floor)) per vocabulary row."""
    delta = jnp.sqrt(jnp.sum(jnp.square(bd.astype(jnp.float32) - pre.astype(jnp.float32)), axis=-1))
    return delta / jnp.log(jnp.maximum(counts.astype(jnp.float32), floor))


def purify_embeddings(top_k: int, counts: np.ndarray, *, floor: float = 20.0) -> Elementwise:
    """Reset the `top_k` embedding rows with the highest δ/log(max(f, floor)) to the pretrained
    ones; `counts` [vocab] are token frequencies in clean data (`token_counts`). top_k = 0 is
    the identity."""
    if top_k < 0:
        raise ConfigError(f"purify_embeddings top_k={top_k} must be >= 0")
    if floor <= 1.0:
        raise ConfigError(f"purify_embeddings floor={floor} must be > 1 (it is inside a logarithm)")
    counts = np.asarray(counts)

    def fn(path, bd, pre, key, stats):
        if counts.shape != (bd.shape[0],):
            raise ConfigError(f"purify_embeddings: token counts cover {counts.shape[0]} ids but the embedding "
                              f"has {bd.shape[0]} rows; count with this model's tokenizer")
        _, rows = jax.lax.top_k(embedding_scores(bd, pre, jnp.asarray(counts), floor), min(top_k, bd.shape[0]))
        return bd.at[rows].set(pre[rows])

    return Elementwise(f"purify_embeddings(top_k={top_k})", fn, None,
                       touches=lambda path: top_k > 0 and path == "embedding")
