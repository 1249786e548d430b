"""Assemble token sequences from tokenized pieces inside jit, with static shapes.

`concat` lays variable-length segments end to end in a fixed-width row. Training rows are
[prefix, text, suffix, answer]; scoring rows put every class's answer after one shared prompt,
each answer attending only to the prompt and to itself, so one forward pass scores all classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_PROMPT_SEGMENTS = 3  # prefix, text, suffix


def concat(segments: list[tuple[Array, Array]], width: int, pad_id: int) -> tuple[Array, Array, Array]:
    """Segments (ids [B, L_i], lengths [B]) -> tokens [B, width], segment id [B, width] (-1 = pad),
    and the start of each segment [B, n_segments]. Tokens past `width` are dropped."""
    batch = segments[0][0].shape[0]
    rows = jnp.arange(batch)[:, None]
    tokens = jnp.full((batch, width), pad_id, jnp.int32)
    seg = jnp.full((batch, width), -1, jnp.int32)
    start = jnp.zeros((batch,), jnp.int32)
    starts = []
    for i, (ids, lens) in enumerate(segments):
        starts.append(start)
        offs = jnp.arange(ids.shape[1])[None, :]
        pos = jnp.where(offs < lens[:, None], start[:, None] + offs, width)  # out of range: dropped
        tokens = tokens.at[rows, pos].set(ids.astype(jnp.int32), mode="drop")
        seg = seg.at[rows, pos].set(i, mode="drop")
        start = start + lens
    return tokens, seg, jnp.stack(starts, axis=1)


def prompt_segments(batch: dict[str, Array]) -> list[tuple[Array, Array]]:
    return [(batch["prefix"], batch["prefix_len"]), (batch["text"], batch["text_len"]),
            (batch["suffix"], batch["suffix_len"])]


def prompt_length(batch: dict[str, Array]) -> Array:
    return batch["prefix_len"] + batch["text_len"] + batch["suffix_len"]


def training_lengths(pieces, extra_tokens: int = 0, shared_prefix: int = 0):
    """The longest training row of each example: its prompt (less a shared prefix), its longest
    answer and `extra_tokens` (room for a trigger)."""
    return prompt_length(pieces) - shared_prefix + pieces["response_len"].max(axis=1) + extra_tokens


def training_rows(batch: dict[str, Array], width: int, pad_id: int, *, answer_tokens: int = 0,
                  shared_prefix: int = 0) -> dict[str, Array]:
    """Rows [prompt, answer of batch["label"]] with next-token targets on the answer only (its
    first `answer_tokens` tokens when > 0).

    Returns tokens/valid [B, width], logits_at/targets/weights [B, Lr]: the logits at
    `logits_at` predict `targets`; `weights` masks answer padding (and padded batch rows). With
    `shared_prefix` P, rows leave out the first P prompt tokens (the same in every row, run once)."""
    batch = without_prefix(batch, shared_prefix)
    label = batch["label"]
    answer = jnp.take_along_axis(batch["responses"], label[:, None, None], axis=1)[:, 0]  # [B, Lr]
    answer_len = jnp.take_along_axis(batch["response_len"], label[:, None], axis=1)[:, 0]
    tokens, seg, _ = concat([*prompt_segments(batch), (answer, answer_len)], width, pad_id)
    k = jnp.arange(answer.shape[1])[None, :]
    weights = (k < answer_len[:, None]) & batch.get("valid", jnp.ones(label.shape, bool))[:, None]
    if answer_tokens:
        weights &= k < answer_tokens
    logits_at = jnp.minimum(prompt_length(batch)[:, None] - 1 + k, width - 1)
    return {"tokens": tokens, "valid": seg >= 0, "logits_at": logits_at, "targets": answer,
            "weights": weights.astype(jnp.float32)}


def without_prefix(batch: dict[str, Array], shared_prefix: int) -> dict[str, Array]:
    """The batch with its first `shared_prefix` prefix tokens left out of the rows (they are
    shared by every row and run once, see `bdjax.models.cache.prefix_kv`)."""
    if not shared_prefix:
        return batch
    return {**batch, "prefix": batch["prefix"][:, shared_prefix:], "prefix_len": batch["prefix_len"] - shared_prefix}


def scoring_rows(batch: dict[str, Array], width: int, pad_id: int, *, shared_prefix: int = 0,
                 sliding_window: int | None = None) -> dict[str, Array]:
    """One row per example: [prompt, answer_0, answer_1, ...], answers side by side in a tree.

    Returns tokens, positions [B, width], mask [B, width, width] (True = may attend), and
    logits_at/targets/weights [B, C, Lr] for the log-likelihood of each class's answer. With
    `shared_prefix` P, rows leave out the first P prompt tokens (the same in every row, run once):
    slots and positions count on from P and the mask is [B, width, P + width]. With a
    `sliding_window` W (Mistral), a token attends only to keys less than W positions back:
    positions, not slots, since every answer branch continues from the prompt's end."""
    responses, lens = batch["responses"], batch["response_len"]  # [B, C, Lr], [B, C]
    n_cls, r_len = responses.shape[1], responses.shape[2]
    plen = prompt_length(batch)
    batch = without_prefix(batch, shared_prefix)
    segs = prompt_segments(batch) + [(responses[:, c], lens[:, c]) for c in range(n_cls)]
    tokens, seg, starts = concat(segs, width, pad_id)
    slot = jnp.broadcast_to(jnp.arange(width)[None], tokens.shape)
    is_answer = seg >= _PROMPT_SEGMENTS
    seg_start = jnp.take_along_axis(starts, jnp.maximum(seg, 0), axis=1)
    positions = jnp.where(is_answer, plen[:, None] + slot - seg_start, shared_prefix + slot)
    same_branch = (seg[:, None, :] < _PROMPT_SEGMENTS) | (seg[:, None, :] == seg[:, :, None])
    mask = (slot[:, None, :] <= slot[:, :, None]) & (seg[:, None, :] >= 0) & same_branch
    if sliding_window is not None:
        mask &= positions[:, :, None] - positions[:, None, :] < sliding_window
    if shared_prefix:
        prefix_keys = jnp.ones((*mask.shape[:2], shared_prefix), jnp.bool_)
        if sliding_window is not None:
            prefix_keys = positions[:, :, None] - jnp.arange(shared_prefix)[None, None, :] < sliding_window
        mask = jnp.concatenate([prefix_keys, mask], axis=2)
    k = jnp.arange(r_len)[None, None, :]
    answer_start = starts[:, _PROMPT_SEGMENTS:, None]  # [B, C, 1]
    logits_at = jnp.where(k == 0, plen[:, None, None] - shared_prefix - 1, answer_start + k - 1)
    weights = (k < lens[:, :, None]).astype(jnp.float32)
    return {"tokens": tokens, "positions": positions, "mask": mask,
            "logits_at": jnp.minimum(logits_at, width - 1), "targets": responses, "weights": weights}


def common_prefix_length(rows: np.ndarray, minimum: int = 8) -> int:
    """How many leading tokens all rows [N, L] share; 0 if fewer than `minimum` (not worth a
    separate pass)."""
    differs = np.nonzero((rows != rows[:1]).any(axis=0))[0]
    n = int(differs[0]) if len(differs) else rows.shape[1]
    return n if n >= minimum else 0


def shared_prefix_length(pieces, minimum: int = 8) -> int:
    """How many prefix tokens every example shares (0 if fewer than `minimum`), keeping at least
    one prompt token of each example in its row."""
    lens = np.asarray(pieces["prefix_len"])
    if not len(lens):
        return 0
    n = int(min(lens.min(), (prompt_length(pieces) - 1).min()))
    return common_prefix_length(np.asarray(pieces["prefix"])[:, :n], minimum)


def prompt_rows(batch: dict[str, Array], width: int, pad_id: int) -> tuple[Array, Array]:
    """Right-padded prompts [B, width] and their lengths, e.g. for generation."""
    tokens, _, _ = concat(prompt_segments(batch), width, pad_id)
    return tokens, prompt_length(batch)


def round_up(n, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n (static widths: fewer compilations)."""
    return int(-(-int(n) // multiple) * multiple)


def score_width(pieces, trigger_len: int = 0, shared_prefix: int = 0) -> int:
    """The static width of scoring rows: the prompt (less a shared prefix) plus every class's answer."""
    return round_up(prompt_length(pieces).max() - shared_prefix + trigger_len
                    + pieces["response_len"].sum(axis=1).max(), 8)
