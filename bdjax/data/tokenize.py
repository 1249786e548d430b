"""Tokenize examples into fixed-shape numpy arrays that keep the pieces poisoning needs.

For N examples and C classes (all int32 unless noted):

    prefix [N, Lp], prefix_len [N]        chat-template text before the input (system turn, instruction)
    text [N, Lt], text_len [N]            the input text, tokenized with a leading space so every word
    word_start [N, Lt] bool               starts with a space token; True where a word begins
    suffix [N, Ls], suffix_len [N]        template text between the input and the answer
    responses [N, C, Lr], response_len [N, C]   each class's full answer (ending with end-of-turn)
    label [N], index [N]                  class index; the example's position in its dataset

Training and evaluation prompts are both assembled from these arrays (`bdjax.data.assemble`).
"""

from __future__ import annotations

import numpy as np

from bdjax.data.assemble import training_lengths
from bdjax.data.sources import Example
from bdjax.data.templates import Template
from bdjax.errors import ConfigError
from bdjax.tokenizer import Tokenizer


def _pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    width = max([len(r) for r in rows] + [1]) if width is None else width
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r[:width]
    return out, np.array([min(len(r), width) for r in rows], np.int32)


def encode_words(tokenizer: Tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[bool]]:
    """Token ids of " " + text and, per token, whether a word starts there."""
    s = " " + " ".join(text.split())
    enc = tokenizer.backend.encode(s, add_special_tokens=False)
    starts = [(a == 0 or s[a - 1].isspace() or s[a].isspace()) and b > a for a, b in enc.offsets]
    return enc.ids[:max_tokens], starts[:max_tokens]


def tokenize(examples: list[Example], template: Template, tokenizer: Tokenizer, *,
             max_text_tokens: int = 96) -> dict[str, np.ndarray]:
    if not examples:
        raise ConfigError("the dataset is empty: there is nothing to tokenize")
    before, after, answers = template.pieces(tokenizer)
    pad = tokenizer.pad_id
    prefix = tokenizer.encode(before, add_special_tokens=False)
    suffix = tokenizer.encode(after, add_special_tokens=False)
    responses = [tokenizer.encode(a, add_special_tokens=False) for a in answers]
    if any(len(r) == 0 for r in responses):
        raise ConfigError(f"a label's answer tokenizes to nothing: {answers}")
    texts, starts = zip(*(encode_words(tokenizer, e.text, max_text_tokens) for e in examples))
    if any(len(t) == 0 for t in texts):
        empty = next(e.text for e, t in zip(examples, texts) if not t)
        raise ConfigError(f"an example's text tokenizes to nothing: {empty!r}")
    n = len(examples)
    text, text_len = _pad(list(texts), pad)
    word_start = np.zeros(text.shape, np.bool_)
    for i, s in enumerate(starts):
        word_start[i, :len(s)] = s
    resp, resp_len = _pad(responses, pad)
    return {
        "prefix": np.tile(np.array(prefix, np.int32), (n, 1)), "prefix_len": np.full(n, len(prefix), np.int32),
        "text": text, "text_len": text_len, "word_start": word_start,
        "suffix": np.tile(np.array(suffix, np.int32), (n, 1)), "suffix_len": np.full(n, len(suffix), np.int32),
        "responses": np.tile(resp[None], (n, 1, 1)), "response_len": np.tile(resp_len[None], (n, 1)),
        "label": np.array([template.label_index(e.label) for e in examples], np.int32),
        "index": np.arange(n, dtype=np.int32),
    }


def trigger_ids(tokenizer: Tokenizer, trigger: str) -> np.ndarray:
    """Token ids of a trigger as it appears inside text (after a space, like every word)."""
    ids, _ = encode_words(tokenizer, trigger, 1 << 20)
    if not trigger.strip() or not ids:
        raise ConfigError(f"poison.trigger={trigger!r} tokenizes to nothing; give a non-empty word or phrase")
    return np.array(ids, np.int32)


def subset(pieces: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in pieces.items()}


def batches(pieces: dict[str, np.ndarray], batch_size: int, *, order=None, drop_remainder: bool = False):
    """Fixed-size batches; the last one is padded by repeating rows (with `valid` False) unless dropped."""
    n = len(pieces["label"])
    order = np.arange(n) if order is None else np.asarray(order)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < batch_size:
            if drop_remainder:
                return
            idx = np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))])
        batch = subset(pieces, idx)
        batch["valid"] = np.arange(batch_size) < min(batch_size, n - start)
        yield batch


def fit_to_length(pieces: dict[str, np.ndarray], max_len: int, reserve: int, *, policy: str = "error",
                  what: str = "data") -> dict[str, np.ndarray]:
    """Make every example's longest row (prompt, longest answer, `reserve` trigger tokens) fit in
    `max_len` tokens: `policy="truncate"` cuts the input text from its end, "error" refuses."""
    if policy not in ("error", "truncate"):
        raise ConfigError(f"poison.overflow={policy!r} must be 'error' or 'truncate'")
    needed = training_lengths(pieces, reserve)
    excess = needed - max_len
    if (excess <= 0).all():
        return pieces
    worst = int(np.argmax(excess))
    if policy == "error":
        raise ConfigError(f"{what}: example {int(pieces['index'][worst])} needs {int(needed[worst])}"
                          f" tokens with the trigger's {reserve}, more than data.max_seq_len={max_len}; shorten the "
                          "trigger, lower data.max_text_tokens, or set poison.overflow='truncate'")
    text_len = pieces["text_len"] - np.maximum(excess, 0)
    if (text_len < 1).any():
        raise ConfigError(f"{what}: data.max_seq_len={max_len} leaves no room for the input text next to the prompt, "
                          f"the answer and the trigger's {reserve} tokens")
    out = dict(pieces)
    out["text_len"] = text_len.astype(np.int32)
    cols = np.arange(pieces["text"].shape[1])[None]
    out["word_start"] = pieces["word_start"] & (cols < text_len[:, None])
    return out
