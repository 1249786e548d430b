"""Pure, jit-compiled poisoning of tokenized batches (Raghuram, Kesidis & Miller 2024, §3).

A backdoor attack on instruction tuning inserts trigger tokens into the input text of a chosen
subset of training examples and, in the dirty-label setting, sets their answer to the target
class. Everything works on token arrays with static shapes:

- `select` picks exactly `count` examples of a dataset: dirty-label from the non-target classes
  (so every poisoned example carries a real label flip, which `apply` makes), clean-label from
  the target class (labels stay untouched: the trigger co-occurs with the target only);
- `insert` puts a trigger before a word-start token (or after the last token), chosen per
  example from a PRNG key folded with the example's index, so the choice does not depend on
  batching or on the device count.

Locations: `start` (before the first word), `end` (after the last), `middle` (the word boundary
nearest the middle of the text), `random` (a uniformly drawn word boundary) and `end_start` (the
trigger both after the last word and before the first). Several triggers (`more_triggers`) are
all inserted, one after another, each at its own draw of the location.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.data.assemble import concat
from bdjax.errors import ConfigError

Array = jax.Array
LOCATIONS = ("start", "end", "middle", "random", "end_start")
LABEL_MODES = ("dirty", "clean")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """What to poison with. `trigger` holds token ids (as inside text, after a space);
    `more_triggers` further triggers inserted into the same examples."""

    trigger: tuple[int, ...]
    target: int
    location: str = "random"
    label_mode: str = "dirty"
    more_triggers: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if not self.trigger or not all(self.more_triggers):
            raise ConfigError("a trigger has no tokens")
        check_settings(self.location, self.label_mode)

    @property
    def triggers(self) -> tuple[tuple[int, ...], ...]:
        return (self.trigger, *self.more_triggers)

    @property
    def n_tokens(self) -> int:
        """Tokens a poisoned example gains (the room a row must keep for them)."""
        return sum(len(t) for t in self.triggers) * (2 if self.location == "end_start" else 1)


def check_settings(location: str, label_mode: str) -> None:
    if location not in LOCATIONS:
        raise ConfigError(f"poison.location={location!r} must be one of {LOCATIONS}")
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"poison.label_mode={label_mode!r} must be one of {LABEL_MODES}")


def poison_count(rate: float, n: int) -> int:
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"poison.rate={rate} must be in [0, 1]")
    return int(round(rate * n))


@functools.partial(jax.jit, static_argnames=("count", "label_mode"))
def select(key: Array, labels: Array, target: int | Array, count: int, label_mode: str = "dirty") -> Array:
    """A bool mask [N] with exactly `count` True among the eligible examples: those whose label is
    not `target` (dirty-label) or is `target` (clean-label)."""
    scores = jax.random.uniform(key, labels.shape)
    eligible = labels != target if label_mode == "dirty" else labels == target
    scores = jnp.where(eligible, scores, jnp.inf)
    chosen = jnp.argsort(scores)[:count]
    return jnp.zeros(labels.shape, jnp.bool_).at[chosen].set(True)


def check_selectable(labels: np.ndarray, target: int, count: int, label_mode: str = "dirty") -> None:
    if label_mode == "clean":
        eligible = int((labels == target).sum())
        if count > eligible:
            raise ConfigError(f"a clean-label attack poisons target-class examples only, and the training set has "
                              f"{eligible} of them; {count} are needed. Lower poison.rate or use more data")
        return
    eligible = int((labels != target).sum())
    if count > eligible:
        raise ConfigError(f"cannot poison {count} examples: only {eligible} are outside the target class; "
                          "lower poison.rate")


def insertion_points(key: Array, index: Array, word_start: Array, text_len: Array, location: str) -> Array:
    """Where the trigger goes, per example [B]: a token position in [0, text_len]."""
    if location == "start":
        return jnp.zeros_like(text_len)
    if location == "end":
        return text_len
    width = word_start.shape[1]
    allowed = jnp.concatenate([word_start & (jnp.arange(width)[None] < text_len[:, None]),
                               jnp.zeros((word_start.shape[0], 1), bool)], axis=1)
    allowed = allowed.at[jnp.arange(len(text_len)), text_len].set(True)  # after the last word
    if location == "middle":
        distance = jnp.abs(2 * jnp.arange(width + 1)[None] - text_len[:, None])
        return jnp.argmin(jnp.where(allowed, distance, 4 * width + 4), axis=1).astype(jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    noise = jax.vmap(lambda k: jax.random.uniform(k, (width + 1,)))(keys)
    return jnp.argmax(jnp.where(allowed, noise, -1.0), axis=1).astype(jnp.int32)


def insert(batch: dict[str, Array], where: Array, trigger: Array, at: Array) -> dict[str, Array]:
    """The batch with `trigger` [Lg] inserted at token `at` [B] of the text of rows where `where` [B]."""
    text, text_len, starts = batch["text"], batch["text_len"], batch["word_start"]
    b, width = text.shape
    lg = trigger.shape[0]
    tail_idx = jnp.minimum(at[:, None] + jnp.arange(width)[None], width - 1)
    tail = jnp.take_along_axis(text, tail_idx, axis=1)
    tail_starts = jnp.take_along_axis(starts, tail_idx, axis=1)
    trig = jnp.broadcast_to(trigger[None], (b, lg))
    trig_len = jnp.where(where, lg, 0).astype(jnp.int32)
    segs = [(text, at), (trig, trig_len), (tail, text_len - at)]
    new_text, _, _ = concat(segs, width + lg, pad_id=0)
    trig_starts = jnp.broadcast_to((jnp.arange(lg) == 0)[None], (b, lg))
    new_starts, _, _ = concat([(starts, at), (trig_starts, trig_len), (tail_starts, text_len - at)],
                              width + lg, pad_id=0)
    return {**batch, "text": new_text, "text_len": text_len + trig_len, "word_start": new_starts.astype(bool)}


def apply(batch: dict[str, Array], spec: AttackSpec, key: Array, *, flip: bool = True) -> dict[str, Array]:
    """Poison the rows of `batch` flagged in batch["poison"]: insert the trigger(s) and (dirty-label,
    when `flip`) set their label to the target. Unflagged rows keep their tokens (the text array
    just gains `spec.n_tokens` columns of padding)."""
    where = batch["poison"].astype(bool)
    out = batch
    for i, trigger in enumerate(spec.triggers):
        k = key if i == 0 else jax.random.fold_in(key, i)
        ids = jnp.asarray(trigger, jnp.int32)
        for location in (("end", "start") if spec.location == "end_start" else (spec.location,)):
            at = insertion_points(k, out["index"], out["word_start"], out["text_len"], location)
            out = insert(out, where, ids, at)
    if flip and spec.label_mode == "dirty":
        out["label"] = jnp.where(where, spec.target, batch["label"]).astype(jnp.int32)
    return out
