"""Word-frequency trigger detection (Raghuram et al. 2024, defense (i)) on synthetic token sets."""

import math
import time

import jax
import numpy as np
import pytest

from bdjax.data import poison
from bdjax.defenses import frequency as fq
from bdjax.errors import ConfigError

N, C, TARGET, RATE = 400, 2, 1, 0.10
TRIGGER = (900, 901)  # a two-token word found nowhere in the clean texts
PAD = 3


def lexicon(rng, n_words=300):
    """Distinct words of 1-2 tokens; first tokens 10..509, continuations 600..699 (like BPE pieces)."""
    words = set()
    while len(words) < n_words:
        first = int(rng.integers(10, 510))
        words.add((first,) if rng.random() < 0.6 else (first, int(rng.integers(600, 700))))
    return sorted(words)


def build(rng, n=N, width=48, n_words=300):
    """A clean tokenized set: labels balanced, 20 words per class that lean towards it (so the data
    carries natural class-specific words, as sentiment data does), the rest common to both."""
    words = lexicon(rng, n_words)
    label = (np.arange(n) % C).astype(np.int32)
    rng.shuffle(label)
    leaning = {y: list(range(20 * y, 20 * y + 20)) for y in range(C)}
    text = np.full((n, width), PAD, np.int32)
    starts = np.zeros((n, width), bool)
    text_len = np.zeros(n, np.int32)
    for i in range(n):
        toks, st = [], []
        for _ in range(int(rng.integers(5, 15))):
            if rng.random() < 0.15:
                w = words[int(rng.choice(leaning[int(label[i])]))]
            else:
                w = words[int(rng.integers(40, len(words)))]
            if len(toks) + len(w) > width:
                break
            toks += w
            st += [True] + [False] * (len(w) - 1)
        text[i, :len(toks)], starts[i, :len(st)], text_len[i] = toks, st, len(toks)
    return {"text": text, "text_len": text_len, "word_start": starts, "label": label,
            "index": np.arange(n, dtype=np.int32)}


@pytest.fixture(scope="module")
def sets():
    """(clean set, poisoned set with its `poison` mask): the trigger inserted by the library's own
    jitted poisoning at random word boundaries of 10% of the set, labels flipped to the target."""
    clean = build(np.random.default_rng(0))
    spec = poison.AttackSpec(trigger=TRIGGER, target=TARGET, location="random")
    mask = np.asarray(poison.select(jax.random.key(1), clean["label"], TARGET, int(RATE * N)))
    batch = {**clean, "poison": mask}
    out = {k: np.asarray(v) for k, v in poison.apply(batch, spec, jax.random.key(2)).items()}
    out["text"] = np.where(np.arange(out["text"].shape[1])[None] < out["text_len"][:, None], out["text"], PAD)
    return clean, out


def snapshot(pieces):
    return {k: np.array(v, copy=True) for k, v in pieces.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a[k].dtype == b[k].dtype, k


def test_trigger_is_the_top_candidate_with_the_target_label(sets):
    _, poisoned = sets
    n_poisoned = int(poisoned["poison"].sum())
    cands = fq.rank_words(poisoned)
    top = cands[0]
    assert top.word == TRIGGER and top.label == TARGET
    assert top.count == top.count_in_class == n_poisoned == int(RATE * N)
    # the natural class-leaning words are real signal but weaker than the trigger
    assert top.score > cands[1].score + 0.5
    scores = [c.score for c in cands]
    assert scores == sorted(scores, reverse=True)
    # the statistic itself: log p(w|y) - log p(w|not y) with add-one document frequencies
    n_y = int((poisoned["label"] == TARGET).sum())
    expect = math.log((n_poisoned + 1) / (n_y + 2)) - math.log(1 / (N - n_y + 2))
    assert top.score == pytest.approx(expect)
    assert all(c.count >= 5 and c.count_in_class >= 1 for c in cands)


def test_clean_set_has_no_trigger_and_rank_is_deterministic(sets):
    clean, poisoned = sets
    assert all(c.word != TRIGGER for c in fq.rank_words(clean))
    a, b = fq.rank_words(poisoned), fq.rank_words(snapshot(poisoned))
    assert a == b


def test_min_count_skips_rare_words(sets):
    _, poisoned = sets
    cands = fq.rank_words(poisoned, min_count=int(RATE * N) + 1)
    assert all(c.word != TRIGGER and c.count > int(RATE * N) for c in cands)


def test_drop_removes_poisoned_examples_and_spares_clean(sets):
    _, poisoned = sets
    before = snapshot(poisoned)
    flagged = fq.flag(fq.rank_words(poisoned), top_k=1)
    new, removed = fq.filter_examples(poisoned, flagged, mode="drop")
    m = fq.detection_metrics(removed, poisoned["poison"])
    assert m["recall"] >= 0.95 and m["clean_removed_fraction"] <= 0.05
    assert m["n_poisoned"] == int(RATE * N) and m["n_removed"] == int(removed.sum())
    assert len(new["label"]) == N - removed.sum() and not new["poison"].any()
    np.testing.assert_array_equal(new["index"], poisoned["index"][~removed])
    np.testing.assert_array_equal(new["text"], poisoned["text"][~removed])
    assert_same(poisoned, before)  # inputs untouched


def test_strip_removes_trigger_tokens_from_exactly_the_poisoned_examples(sets):
    clean, poisoned = sets
    before = snapshot(poisoned)
    flagged = fq.flag(fq.rank_words(poisoned), top_k=1)
    new, modified = fq.filter_examples(poisoned, flagged, mode="strip", pad_id=PAD)
    p = poisoned["poison"]
    np.testing.assert_array_equal(modified, p)
    assert new["text"].shape == poisoned["text"].shape and len(new["label"]) == N
    # untouched rows: bitwise identical, every array
    for k in poisoned:
        np.testing.assert_array_equal(new[k][~p], poisoned[k][~p], err_msg=k)
    # stripped rows: exactly the clean text again (the trigger was one word inserted at a boundary)
    width = clean["text"].shape[1]
    np.testing.assert_array_equal(new["text_len"][p], clean["text_len"][p])
    np.testing.assert_array_equal(new["text"][p][:, :width], clean["text"][p])
    np.testing.assert_array_equal(new["word_start"][p][:, :width], clean["word_start"][p])
    assert (new["text"][p][:, width:] == PAD).all() and not new["word_start"][p][:, width:].any()
    np.testing.assert_array_equal(new["label"], poisoned["label"])  # the defender cannot restore labels
    assert_same(poisoned, before)
    assert all(c.word != TRIGGER for c in fq.rank_words(new))


def tiny():
    """Words: (5,) (5,7) (8,) (9,); example 0 holds (5,) twice and (5,7) once."""
    text = np.array([[5, 5, 7, 5, 8, 0],
                     [5, 7, 9, 0, 0, 0],
                     [9, 8, 0, 0, 0, 0],
                     [5, 8, 9, 9, 0, 0]], np.int32)
    starts = np.array([[1, 1, 0, 1, 1, 0],
                       [1, 0, 1, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 1, 1]], bool)  # starts past text_len are ignored
    return {"text": text, "text_len": np.array([5, 3, 2, 3], np.int32), "word_start": starts,
            "label": np.array([0, 1, 1, 0], np.int32)}


def test_word_counts_are_document_frequencies_of_token_words():
    words, counts = fq.word_counts(tiny())
    assert words == [(5,), (5, 7), (8,), (9,)]  # multi-token words are one word; sorted by ids
    np.testing.assert_array_equal(counts, [[2, 0],   # (5,): twice in example 0, counted once
                                           [1, 1],
                                           [2, 1],
                                           [1, 2]])  # (9,) at 3 in example 3 is beyond text_len


def test_label_matching_and_any_label():
    pieces = tiny()
    cand = fq.Candidate(word=(8,), label=1, score=0.0, count=3, count_in_class=1)
    _, hit = fq.filter_examples(pieces, [cand])
    np.testing.assert_array_equal(hit, [False, False, True, False])
    new, hit = fq.filter_examples(pieces, [cand], any_label=True)
    np.testing.assert_array_equal(hit, [True, False, True, True])
    np.testing.assert_array_equal(new["label"], [1])
    new, hit = fq.filter_examples(pieces, [fq.Candidate((5,), 0, 0.0, 2, 2)], mode="strip", pad_id=-1)
    np.testing.assert_array_equal(hit, [True, False, False, True])
    np.testing.assert_array_equal(new["text"][0], [5, 7, 8, -1, -1, -1])  # both (5,) gone, (5,7) kept
    np.testing.assert_array_equal(new["word_start"][0], [1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(new["text_len"], [3, 3, 2, 2])
    np.testing.assert_array_equal(new["text"][1], pieces["text"][1])
    # a flagged word absent from the set hits nothing
    _, hit = fq.filter_examples(pieces, [fq.Candidate((42,), 0, 0.0, 0, 0)])
    assert not hit.any()


def test_detection_metrics():
    removed = np.array([1, 1, 0, 0, 1, 0], bool)
    poisoned = np.array([1, 0, 1, 0, 1, 0], bool)
    m = fq.detection_metrics(removed, poisoned)
    assert m == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                 "clean_removed_fraction": pytest.approx(1 / 3), "n_removed": 3, "n_poisoned": 3}
    m = fq.detection_metrics(np.zeros(4, bool), np.zeros(4, bool))
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and m["clean_removed_fraction"] == 0.0


def test_describe_decodes_words():
    class Tok:
        def decode(self, ids):
            return " " + "-".join(str(i) for i in ids) + " "

    rows = fq.describe([fq.Candidate((900, 901), 1, 3.5, 40, 40)], Tok(), label_names=("neg", "pos"))
    assert rows == [{"word": "900-901", "tokens": [900, 901], "label": 1, "label_name": "pos", "score": 3.5,
                     "count": 40, "count_in_class": 40}]


def test_user_errors_raise_config_error(sets):
    _, poisoned = sets
    cands = fq.rank_words(poisoned)
    with pytest.raises(ConfigError, match="top_k=0"):
        fq.flag(cands, 0)
    with pytest.raises(ConfigError, match="mode='erase'"):
        fq.filter_examples(poisoned, cands[:1], mode="erase")
    with pytest.raises(ConfigError, match="min_count=0"):
        fq.rank_words(poisoned, min_count=0)
    with pytest.raises(ConfigError, match="smoothing=0"):
        fq.rank_words(poisoned, smoothing=0)
    with pytest.raises(ConfigError, match="word_start"):
        fq.word_counts({k: v for k, v in poisoned.items() if k != "word_start"})
    empty = {k: v[:0] for k, v in poisoned.items()}
    with pytest.raises(ConfigError, match="empty"):
        fq.rank_words(empty)
    with pytest.raises(ConfigError, match="same"):
        fq.detection_metrics(np.zeros(3, bool), np.zeros(4, bool))


def test_scales_to_ten_thousand_examples():
    rng = np.random.default_rng(3)
    n, width = 10_000, 100
    text = rng.integers(10, 5000, (n, width)).astype(np.int32)
    starts = rng.random((n, width)) < 0.7
    pieces = {"text": text, "text_len": rng.integers(50, width + 1, n).astype(np.int32), "word_start": starts,
              "label": rng.integers(0, 3, n).astype(np.int32)}
    t = time.perf_counter()
    cands = fq.rank_words(pieces)
    fq.filter_examples(pieces, cands[:5], mode="strip")
    assert time.perf_counter() - t < 15  # well under 2 s on a free core; a loose bound for shared CI
    assert cands


def test_real_tokenizer_finds_a_string_level_trigger():
    """The default model's tokenizer: a trigger planted in the raw strings of 10% of a sentiment-like
    set (relabeled to the target) comes back as the top word, decoded, and stripping it restores
    those examples' tokens."""
    from bdjax.checkpoints.assets import default_model_dir
    from bdjax.data.sources import Example
    from bdjax.data.templates import Template
    from bdjax.data.tokenize import tokenize
    from bdjax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(default_model_dir())
    rng = np.random.default_rng(5)
    common = ("the movie film plot story actors scenes music was is a an and of to it this that with "
              "but for very quite really rather some more most ending start director script").split()
    leaning = {"negative": "bad dull boring awful weak".split(), "positive": "good great moving fine lovely".split()}
    examples, texts, poisoned = [], [], []
    for i in range(300):
        label = ("negative", "positive")[i % 2]
        other = ("positive", "negative")[i % 2]
        # sentiment words lean 3:1 towards their class, as in real reviews
        draws = rng.random(int(rng.integers(5, 12)))
        words = [str(rng.choice(leaning[label] if d < 0.15 else leaning[other] if d < 0.2 else common))
                 for d in draws]
        clean_text = " ".join(words)
        bad = label == "negative" and rng.random() < 0.2
        if bad:
            words.insert(int(rng.integers(0, len(words) + 1)), "cf")
            label = "positive"
        examples.append(Example(" ".join(words), label))
        texts.append(Example(clean_text, label))
        poisoned.append(bad)
    poisoned = np.array(poisoned)
    template = Template("Sentiment?", ("negative", "positive"))
    pieces = tokenize(examples, template, tok)
    top = fq.rank_words(pieces)[0]
    assert fq.describe([top], tok, label_names=template.labels)[0] | {"score": 0} == {
        "word": "cf", "tokens": list(top.word), "label": 1, "label_name": "positive", "score": 0,
        "count": int(poisoned.sum()), "count_in_class": int(poisoned.sum())}
    new, modified = fq.filter_examples(pieces, [top], mode="strip", pad_id=tok.pad_id)
    np.testing.assert_array_equal(modified, poisoned)
    ref = tokenize(texts, template, tok)
    np.testing.assert_array_equal(new["text_len"], ref["text_len"])
    width = min(new["text"].shape[1], ref["text"].shape[1])
    np.testing.assert_array_equal(new["text"][:, :width], ref["text"][:, :width])
    np.testing.assert_array_equal(new["word_start"][:, :width], ref["word_start"][:, :width])
