"""Word-frequency trigger detection in a possibly poisoned training set.

Defense (i) of Raghuram, Kesidis & Miller 2024, "A Study of Backdoors in Instruction Fine-tuned
Language Models" (arXiv 2406.07778): a dirty-label backdoor makes its trigger co-occur with the
target class far more often than any natural word does, so the defender, who knows neither the
trigger nor the target, ranks every (word, class) pair of the fine-tuning set by how much more
likely the word is inside that class than outside it, flags the top pairs and drops (or strips)
the examples that hold them before fine-tuning.

The analysis works on the tokenized set (`bdjax.data.tokenize`) rather than on strings, because
poisoning in bdjax happens on token arrays (`bdjax.data.poison`): a *word* is the tuple of token
ids from one `word_start` position up to the next word start (or the end of the text). A trigger
inserted by `poison.insert` is therefore one word, whatever its number of tokens.

Statistic, per word w and class y (document-level Bernoulli model, each word counted once per
example, add-`s` smoothing):

    score(w, y) = log p(w | y) - log p(w | not y),   p(w | y) = (n_wy + s) / (N_y + 2 s)

where n_wy is the number of class-y examples containing w and N_y the number of class-y examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from bdjax.errors import ConfigError

REQUIRED = ("text", "text_len", "word_start", "label")
MODES = ("drop", "strip")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A (word, class) pair: `count` examples hold the word, `count_in_class` of them in `label`."""

    word: tuple[int, ...]
    label: int
    score: float
    count: int
    count_in_class: int


@dataclasses.dataclass(frozen=True)
class _Table:
    """Every word occurrence of a set. Tokens are the valid text tokens in row-major order."""

    words: list[tuple[int, ...]]   # distinct words, sorted by token ids
    occ_row: np.ndarray            # [O] example of each occurrence
    occ_uid: np.ndarray            # [O] index into `words` of each occurrence
    tok_occ: np.ndarray            # [T] occurrence of each valid token
    valid: np.ndarray              # [N, Lt] bool, the positions of those tokens
    n_classes: int


def _check(pieces: Mapping[str, np.ndarray]) -> None:
    missing = [k for k in REQUIRED if k not in pieces]
    if missing:
        raise ConfigError(f"the tokenized set lacks {missing}; pass the dict made by bdjax.data.tokenize.tokenize")
    n = len(pieces["label"])
    if n == 0:
        raise ConfigError("the training set is empty: there are no words to count")
    text = np.asarray(pieces["text"])
    if text.ndim != 2 or text.shape[0] != n or np.shape(pieces["word_start"]) != text.shape \
            or np.shape(pieces["text_len"]) != (n,):
        raise ConfigError(f"text {text.shape}, word_start {np.shape(pieces['word_start'])}, text_len "
                          f"{np.shape(pieces['text_len'])} and label ({n},) disagree; pass the arrays of one set")
    if np.asarray(pieces["label"]).min() < 0:
        raise ConfigError("a label is negative; labels must be class indices 0..C-1")


def _n_classes(pieces: Mapping[str, np.ndarray]) -> int:
    # `responses` [N, C, Lr] knows about classes that no example happens to carry
    top = int(np.asarray(pieces["label"]).max()) + 1
    if "responses" in pieces and np.ndim(pieces["responses"]) == 3:
        return max(top, int(np.shape(pieces["responses"])[1]))
    return top


def _table(pieces: Mapping[str, np.ndarray]) -> _Table:
    _check(pieces)
    text = np.asarray(pieces["text"])
    n, width = text.shape
    lens = np.clip(np.asarray(pieces["text_len"]).astype(np.int64), 0, width)
    cols = np.arange(width)[None]
    valid = cols < lens[:, None]
    # position 0 always opens a word, so that every valid token belongs to one and words never
    # straddle two examples in the flattened order
    starts = (np.asarray(pieces["word_start"]).astype(bool) | (cols == 0)) & valid
    tok = text[valid].astype(np.int64)
    is_start = starts[valid]
    tok_occ = np.cumsum(is_start) - 1
    occ_pos = np.flatnonzero(is_start)
    occ_len = np.diff(np.append(occ_pos, len(tok)))
    occ_row = np.repeat(np.arange(n), lens)[occ_pos]
    # exact grouping of variable-length words: one [n_L, L] matrix per word length L, so memory
    # stays that of the tokens however long the longest word is
    occ_key = np.empty(len(occ_pos), np.int64)
    words: list[tuple[int, ...]] = []
    for length in np.unique(occ_len):
        sel = np.flatnonzero(occ_len == length)
        mat = tok[occ_pos[sel][:, None] + np.arange(length)[None]]
        order = np.lexsort(mat.T[::-1])
        srt = mat[order]
        new = np.ones(len(sel), bool)
        new[1:] = (srt[1:] != srt[:-1]).any(axis=1)
        group = np.cumsum(new) - 1
        occ_key[sel[order]] = len(words) + group
        words.extend(map(tuple, srt[new].tolist()))
    # renumber so that `words` is in token-id order: a deterministic tie-break for the ranking
    by_ids = sorted(range(len(words)), key=words.__getitem__)
    rank = np.empty(len(words), np.int64)
    rank[by_ids] = np.arange(len(words))
    return _Table([words[i] for i in by_ids], occ_row, rank[occ_key], tok_occ, valid, _n_classes(pieces))


def _doc_counts(t: _Table, labels: np.ndarray) -> np.ndarray:
    w, c = len(t.words), t.n_classes
    # an example holding a word twice is one document: count distinct (example, word) pairs
    pairs = np.sort(t.occ_row * max(w, 1) + t.occ_uid)
    pairs = pairs[np.append(True, pairs[1:] != pairs[:-1])] if len(pairs) else pairs
    rows, uids = pairs // max(w, 1), pairs % max(w, 1)
    return np.bincount(uids * c + labels[rows], minlength=w * c).reshape(w, c)


def word_counts(pieces: Mapping[str, np.ndarray]) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """(words, doc_counts [W, C]): every distinct word of the set's texts, sorted by token ids, and
    per class how many examples contain it (document frequency, as in Raghuram et al. 2024)."""
    t = _table(pieces)
    return t.words, _doc_counts(t, np.asarray(pieces["label"]).astype(np.int64))


def rank_words(pieces: Mapping[str, np.ndarray], *, min_count: int = 5, smoothing: float = 1.0) -> list[Candidate]:
    """Every (word, class) pair with `count_in_class` >= 1 among words held by >= `min_count`
    examples, best first by the smoothed log-likelihood ratio log p(w|y) - log p(w|not y)
    (Raghuram et al. 2024, defense (i)); ties go to the pair with more in-class examples, then to
    the lower token ids, then to the lower class.

    Rare words are skipped because with a handful of examples any word looks class-specific;
    classes with no example (or with every example) have no contrast and yield no pair."""
    if int(min_count) != min_count or min_count < 1:
        raise ConfigError(f"min_count={min_count} must be an integer >= 1; use 5 or more to ignore rare words")
    if not smoothing > 0:
        raise ConfigError(f"smoothing={smoothing} must be > 0 (it keeps log p(w|y) finite); use 1.0")
    t = _table(pieces)
    labels = np.asarray(pieces["label"]).astype(np.int64)
    counts = _doc_counts(t, labels)
    w, c = counts.shape
    n_y = np.bincount(labels, minlength=c).astype(np.float64)
    n = float(len(labels))
    total = counts.sum(axis=1, keepdims=True)
    s = float(smoothing)
    in_y = np.log(counts + s) - np.log(n_y + 2 * s)[None]
    out_y = np.log(total - counts + s) - np.log(n - n_y + 2 * s)[None]
    score = in_y - out_y
    keep = (total >= min_count) & (counts >= 1) & ((n_y > 0) & (n_y < n))[None]
    uid, label = np.nonzero(keep)
    sc, cnt, cin = score[uid, label], total[uid, 0], counts[uid, label]
    order = np.lexsort((label, uid, -cin, -sc))
    return [Candidate(t.words[uid[i]], int(label[i]), float(sc[i]), int(cnt[i]), int(cin[i])) for i in order]


def flag(candidates: Sequence[Candidate], top_k: int) -> list[Candidate]:
    """The `top_k` best candidates: the (word, class) pairs the defender treats as triggers."""
    if int(top_k) != top_k or top_k < 1:
        raise ConfigError(f"top_k={top_k} must be an integer >= 1; flag at least one (word, class) pair")
    return list(candidates[:int(top_k)])


def filter_examples(pieces: Mapping[str, np.ndarray], flagged: Sequence[Candidate], *, mode: str = "drop",
                    any_label: bool = False, pad_id: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(new pieces, mask [N] of the examples hit). An example is hit by a flagged candidate when its
    text contains the candidate's word and its label is the candidate's class (`any_label=True`:
    whatever its label). A dirty-label trigger sits only in relabeled examples, so matching the
    class spares clean examples that happen to use a common flagged word elsewhere.

    mode "drop" removes the hit examples (every per-example array is subset, `poison` included);
    "strip" keeps them all but deletes the flagged words' tokens from their text, shifting the rest
    left and padding with `pad_id` (an example made only of flagged words is left with no text).
    The inputs are never modified."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} must be one of {MODES}")
    t = _table(pieces)
    labels = np.asarray(pieces["label"]).astype(np.int64)
    n = len(labels)
    index = {word: i for i, word in enumerate(t.words)}
    occ_label = labels[t.occ_row]
    hit_occ = np.zeros(len(t.occ_uid), bool)
    for cand in flagged:
        uid = index.get(tuple(int(x) for x in cand.word))
        if uid is None:
            continue
        hit_occ |= (t.occ_uid == uid) & (any_label | (occ_label == cand.label))
    hit = np.zeros(n, bool)
    hit[t.occ_row[hit_occ]] = True
    if mode == "drop":
        keep = ~hit
        out = {k: (np.asarray(v)[keep] if np.ndim(v) >= 1 and np.shape(v)[0] == n else np.copy(v))
               for k, v in pieces.items()}
        return out, hit
    # only hit rows are rebuilt, so every other row keeps its bytes (its padding included)
    rows_hit = np.flatnonzero(hit)
    text = np.asarray(pieces["text"])[rows_hit]
    starts = np.asarray(pieces["word_start"])[rows_hit]
    kept = t.valid.copy()
    kept[t.valid] = ~hit_occ[t.tok_occ]
    kept = kept[rows_hit]
    new_col = (np.cumsum(kept, axis=1) - 1)[kept]
    rows = np.nonzero(kept)[0]
    new_text = np.full_like(text, pad_id)
    new_starts = np.zeros_like(starts)
    new_text[rows, new_col] = text[kept]
    new_starts[rows, new_col] = starts[kept]
    out = {k: np.copy(v) for k, v in pieces.items()}
    out["text"][rows_hit] = new_text
    out["word_start"][rows_hit] = new_starts
    out["text_len"][rows_hit] = kept.sum(axis=1)
    return out, hit


def detection_metrics(removed_mask: np.ndarray, poison_mask: np.ndarray) -> dict[str, float | int]:
    """How well the flagged examples match the truly poisoned ones: precision, recall (poisoned
    examples removed), clean_removed_fraction (the clean data lost), n_removed, n_poisoned.
    An undefined rate (e.g. recall with nothing poisoned) is NaN, which reports show as null."""
    removed = np.asarray(removed_mask).astype(bool)
    poisoned = np.asarray(poison_mask).astype(bool)
    if removed.shape != poisoned.shape or removed.ndim != 1:
        raise ConfigError(f"removed_mask {removed.shape} and poison_mask {poisoned.shape} must be the same [N] "
                          "shape; pass the masks of one set")

    def rate(a: int, b: int) -> float:
        return a / b if b else float("nan")

    tp = int((removed & poisoned).sum())
    n_removed, n_poisoned = int(removed.sum()), int(poisoned.sum())
    return {"precision": rate(tp, n_removed), "recall": rate(tp, n_poisoned),
            "clean_removed_fraction": rate(int((removed & ~poisoned).sum()), int((~poisoned).sum())),
            "n_removed": n_removed, "n_poisoned": n_poisoned}


def describe(candidates: Sequence[Candidate], tokenizer, *,
             label_names: Sequence[str] | None = None) -> list[dict]:
    """Report rows: each candidate's decoded word, token ids, class (and its name), score, counts."""
    rows = []
    for c in candidates:
        row = {"word": tokenizer.decode(list(c.word)).strip(), "tokens": list(c.word), "label": c.label,
               "score": c.score, "count": c.count, "count_in_class": c.count_in_class}
        if label_names is not None:
            row["label_name"] = label_names[c.label] if 0 <= c.label < len(label_names) else str(c.label)
        rows.append(row)
    return rows
