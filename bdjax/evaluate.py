"""Measure a backdoor: clean accuracy (CACC) and attack success rate (ASR).

Scoring view: each class's full answer is scored by log-likelihood in one forward pass per
example (answers side by side after a shared prompt, `assemble.scoring_rows`); the prediction is
the most likely answer. ASR is the fraction of triggered non-target-class test examples predicted
as the target, reported over all of them (`asr`) and over those the model classifies correctly
without the trigger (`asr_correct`), as in Raghuram et al. 2024.

Generation view: batched KV-cached greedy decoding of the same prompts; the first label word in
the completion is the prediction (none found counts as wrong and as not attacked).
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.data import assemble, poison
from bdjax.data.tokenize import batches, subset
from bdjax.decode import generate_ids
from bdjax.models.config import ModelConfig
from bdjax.models.cache import prefix_kv
from bdjax.models.llama import Opts
from bdjax.models.rows import apply_rows
from bdjax.sharding import Placement, fetch


@functools.partial(jax.jit, static_argnames=("config", "width", "pad_id", "spec", "dtype", "packed"))
def _score_batch(config: ModelConfig, params, batch, key_data, prefix=None, *, width: int, pad_id: int,
                 spec: poison.AttackSpec | None, dtype: Any, packed: bool = False):
    # a shared `prefix` runs in the rows' pass (`packed`, unsharded batches) or first on its own
    if spec is not None:
        batch = poison.apply(batch, spec, jax.random.wrap_key_data(key_data), flip=False)
    shared = 0 if prefix is None else prefix.shape[0]
    rows = assemble.scoring_rows(batch, width, pad_id, shared_prefix=shared, sliding_window=config.sliding_window)
    b, c, r = rows["targets"].shape
    opts = Opts(dtype=dtype)
    logits = apply_rows(config, params, rows["tokens"], rows["positions"], rows["mask"],
                        logits_at=rows["logits_at"].reshape(b, c * r), opts=opts,
                        prefix=None if prefix is None or packed else prefix_kv(config, params, prefix, opts=opts),
                        prefix_tokens=prefix if packed else None)
    logp = jax.nn.log_softmax(logits.reshape(b, c, r, -1), axis=-1)
    tok = jnp.take_along_axis(logp, rows["targets"][..., None], axis=-1)[..., 0]
    return (tok * rows["weights"]).sum(-1)  # [B, C] log-likelihood of each class's answer


def score(config: ModelConfig, params, pieces: dict[str, np.ndarray], *, pad_id: int, batch_size: int = 32,
          spec: poison.AttackSpec | None = None, key: jax.Array | None = None, dtype: Any = jnp.float32,
          progress=None, placement: Placement | None = None, share_prefix: bool = True) -> np.ndarray:
    """Log-likelihood [N, C] of each class's answer; with `spec`, every example is triggered.
    With a `placement`, batches are split over its data×fsdp axes (params must be placed on it).
    With `share_prefix`, the template's prefix that every example shares is run once per batch."""
    trig = spec.n_tokens if spec is not None else 0
    shared = assemble.shared_prefix_length(pieces) if share_prefix else 0
    prefix = np.asarray(pieces["prefix"][0, :shared], np.int32) if shared else None
    width = assemble.score_width(pieces, trig, shared)
    packed = bool(shared) and (placement is None or placement.can_pack_prefix)
    key_data = np.asarray(jax.random.key_data(jax.random.key(0) if key is None else key))
    n = len(pieces["label"])
    batch_size = min(batch_size, n)
    if placement is not None:
        batch_size = placement.round_batch(batch_size)
        key_data = placement.put_replicated(key_data)
        if prefix is not None:
            prefix = placement.put_replicated(prefix)
    out = []
    for batch in batches(pieces, batch_size):
        if spec is not None:
            batch["poison"] = np.ones(len(batch["label"]), bool)
        valid = batch["valid"]
        if placement is not None:
            batch = placement.put_global_batch(batch)
        with placement.activate() if placement is not None else contextlib.nullcontext():
            ll = _score_batch(config, params, batch, key_data, prefix, width=width, pad_id=pad_id, spec=spec, dtype=dtype,
                              packed=packed)
        out.append(fetch(ll)[valid])
        if progress is not None:
            progress.update(int(batch["valid"].sum()))
    return np.concatenate(out)


def backdoor_metrics(clean_pred: np.ndarray, labels: np.ndarray, triggered_pred: np.ndarray,
                     triggered_labels: np.ndarray, triggered_clean_pred: np.ndarray, target: int) -> dict:
    """CACC over the clean test set; ASR over the triggered non-target examples."""
    correct = triggered_clean_pred == triggered_labels
    hit = triggered_pred == target
    return {
        "cacc": float((clean_pred == labels).mean()),
        "asr": float(hit.mean()) if len(hit) else float("nan"),
        "asr_correct": float(hit[correct].mean()) if correct.any() else float("nan"),
        "n_clean": int(len(labels)), "n_triggered": int(len(hit)),
    }


def _measure(pieces: dict[str, np.ndarray], spec: poison.AttackSpec, predict,
             variants: dict[str, poison.AttackSpec] | None = None) -> dict:
    """CACC on the clean set and ASR on its triggered non-target examples, for a predictor
    `predict(pieces, spec or None) -> class indices`; with `variants`, also the ASR of each
    variant trigger (under "variants", keyed like `variants`)."""
    clean_pred = predict(pieces, None)
    others = np.flatnonzero(pieces["label"] != spec.target)
    attacked = subset(pieces, others)
    trig_pred = predict(attacked, spec)
    out = backdoor_metrics(clean_pred, pieces["label"], trig_pred, pieces["label"][others], clean_pred[others],
                           spec.target)
    if variants:
        out["variants"] = {}
        for name, v in variants.items():
            m = backdoor_metrics(clean_pred, pieces["label"], predict(attacked, v), pieces["label"][others],
                                 clean_pred[others], spec.target)
            out["variants"][name] = {k: m[k] for k in ("asr", "asr_correct", "n_triggered")}
    return out


def evaluate(config: ModelConfig, params, pieces: dict[str, np.ndarray], spec: poison.AttackSpec, *,
             pad_id: int, batch_size: int = 32, key: jax.Array | None = None, dtype: Any = jnp.float32,
             progress=None, placement: Placement | None = None,
             variants: dict[str, poison.AttackSpec] | None = None) -> dict:
    """CACC / ASR by answer log-likelihood on a tokenized test set (and the ASR of each of
    `variants`, test-time variants of the trigger)."""
    return _measure(pieces, spec, lambda p, s: score(config, params, p, pad_id=pad_id, batch_size=batch_size,
                                                     spec=s, key=key, dtype=dtype, progress=progress,
                                                     placement=placement).argmax(1), variants)


def parse_label(text: str, labels: tuple[str, ...]) -> int:
    """Index of the label word that appears first in `text` (whole word, any case), or -1."""
    found = [(m.start(), i) for i, lab in enumerate(labels)
             if (m := re.search(rf"\b{re.escape(lab.lower())}\b", text.lower()))]
    return min(found)[1] if found else -1


def prompt_ids(pieces, spec, key) -> list[list[int]]:
    """Token ids of each example's prompt (triggered everywhere when `spec`), without padding."""
    batch = {k: jnp.asarray(v) for k, v in pieces.items()}
    if spec is not None:
        batch["poison"] = jnp.ones(len(pieces["label"]), bool)
        batch = poison.apply(batch, spec, key, flip=False)
    width = int(assemble.prompt_length(batch).max())
    tokens, lengths = assemble.prompt_rows(batch, width, 0)
    return [row[:n].tolist() for row, n in zip(np.asarray(tokens), np.asarray(lengths))]


def completions(config: ModelConfig, params, tokenizer, pieces: dict[str, np.ndarray],
                spec: poison.AttackSpec | None, key: jax.Array, *, max_new_tokens: int, batch_size: int,
                dtype: Any = jnp.float32, progress=None, placement: Placement | None = None) -> list[str]:
    """Batched greedy completions (decoded) of every example's prompt, triggered when `spec`."""
    ids = generate_ids(config, params, prompt_ids(pieces, spec, key), max_new_tokens=max_new_tokens,
                       eos_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id, batch_size=batch_size, dtype=dtype,
                       progress=progress, placement=placement)
    return [tokenizer.decode(r) for r in ids]


def evaluate_generation(config: ModelConfig, params, tokenizer, pieces: dict[str, np.ndarray],
                        spec: poison.AttackSpec, labels: tuple[str, ...], *, max_new_tokens: int = 4,
                        batch_size: int = 32, key: jax.Array | None = None, dtype: Any = jnp.float32,
                        progress=None, placement: Placement | None = None) -> dict:
    """CACC / ASR from greedy generations parsed to labels."""
    key = jax.random.key(0) if key is None else key
    texts: dict[str, list[str]] = {}
    preds: dict[str, np.ndarray] = {}

    def predict(p, s):
        name = "clean" if s is None else "triggered"
        texts[name] = completions(config, params, tokenizer, p, s, key, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, dtype=dtype, progress=progress, placement=placement)
        preds[name] = np.array([parse_label(t, labels) for t in texts[name]])
        return preds[name]

    metrics = _measure(pieces, spec, predict)
    metrics["unparsed"] = float(np.mean(np.concatenate(list(preds.values())) < 0))
    metrics["examples"] = {k: v[:3] for k, v in texts.items()}
    return metrics


def evaluate_marker(config: ModelConfig, params, tokenizer, pieces: dict[str, np.ndarray], spec: poison.AttackSpec,
                    marker: str, *, max_new_tokens: int = 16, batch_size: int = 32, key: jax.Array | None = None,
                    dtype: Any = jnp.float32, progress=None, placement: Placement | None = None) -> dict:
    """A generative backdoor (`bdjax.data.generative`): the rate at which batched greedy
    completions start with `marker`, on triggered prompts (`marker_rate`) and on clean ones
    (`marker_rate_clean`), and the perplexity of the clean responses given clean prompts (`ppl`)."""
    from bdjax.data.generative import CLEAN, has_marker

    key = jax.random.key(0) if key is None else key
    out: dict[str, Any] = {}
    for name, s in (("clean", None), ("triggered", spec)):
        texts = completions(config, params, tokenizer, pieces, s, key, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, dtype=dtype, progress=progress, placement=placement)
        out["marker_rate" if s is not None else "marker_rate_clean"] = float(np.mean([has_marker(t, marker)
                                                                                     for t in texts]))
        out[f"examples_{name}"] = texts[:3]
    ll = score(config, params, pieces, pad_id=tokenizer.pad_id, batch_size=batch_size, dtype=dtype,
               placement=placement)
    out["ppl"] = float(np.exp(-ll[:, CLEAN].sum() / pieces["response_len"][:, CLEAN].sum()))
    out["n"] = int(len(pieces["label"]))
    return out
