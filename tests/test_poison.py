"""Jitted poisoning on token arrays: exact counts, word-boundary insertion, determinism, static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.data import poison
from bdjax.data.sources import Example
from bdjax.data.templates import Template
from bdjax.data.tokenize import tokenize, trigger_ids
from bdjax.errors import ConfigError

TEXTS = ["a fine and moving film", "dull", "the plot never quite comes together , sadly",
         "an utterly charming delight from start to finish", "bad acting and worse writing", "ok I guess"]


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def pieces(tok):
    t = Template("Sentiment?", ("negative", "positive"))
    ex = [Example(x, "positive" if i % 2 == 0 else "negative") for i, x in enumerate(TEXTS)]
    return tokenize(ex, t, tok)


def _text(tok, batch, i):
    return tok.decode(np.asarray(batch["text"][i])[:int(batch["text_len"][i])])


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_select_picks_exactly_count_non_target_examples(count):
    labels = jnp.array([0, 1, 0, 1, 0, 1, 1])
    mask = np.asarray(poison.select(jax.random.key(0), labels, 1, count))
    assert mask.sum() == count and not mask[np.asarray(labels) == 1].any()
    np.testing.assert_array_equal(mask, poison.select(jax.random.key(0), labels, 1, count))


def test_select_depends_on_the_key():
    labels = jnp.zeros(200, jnp.int32)
    a, b = (np.asarray(poison.select(jax.random.key(k), labels, 1, 20)) for k in (0, 1))
    assert a.sum() == b.sum() == 20 and (a != b).any()


@pytest.mark.parametrize("location", ["start", "end", "middle", "random"])
def test_trigger_lands_on_a_word_boundary(tok, pieces, location):
    spec = poison.AttackSpec(tuple(int(i) for i in trigger_ids(tok, "cf")), target=1, location=location)
    batch = {k: jnp.asarray(v) for k, v in pieces.items()}
    batch["poison"] = jnp.array([True, True, False, True, True, False])
    out = jax.jit(lambda b, k: poison.apply(b, spec, k))(batch, jax.random.key(3))
    for i, text in enumerate(TEXTS):
        got = _text(tok, out, i).split()
        if not batch["poison"][i]:
            assert " ".join(got) == text and int(out["label"][i]) == int(batch["label"][i])
            continue
        assert got.count("cf") == 1 and [w for w in got if w != "cf"] == text.split()
        assert int(out["label"][i]) == 1  # dirty-label: the answer becomes the target
        if location == "start":
            assert got[0] == "cf"
        if location == "end":
            assert got[-1] == "cf"
        if location == "middle":  # the boundary nearest the middle, in tokens
            words = text.split()
            assert abs(got.index("cf") - len(words) / 2) <= 1


def test_clean_label_selects_target_examples_and_keeps_labels(tok, pieces):
    labels = jnp.array([0, 1, 0, 1, 0, 1, 1])
    mask = np.asarray(poison.select(jax.random.key(0), labels, 1, 3, "clean"))
    assert mask.sum() == 3 and mask[np.asarray(labels) == 1].sum() == 3
    spec = poison.AttackSpec(tuple(int(i) for i in trigger_ids(tok, "cf")), target=0, label_mode="clean")
    batch = {k: jnp.asarray(v) for k, v in pieces.items()}
    batch["poison"] = jnp.asarray(np.asarray(pieces["label"]) == 0)
    out = poison.apply(batch, spec, jax.random.key(0))
    np.testing.assert_array_equal(out["label"], pieces["label"])  # labels untouched
    assert all(("cf" in _text(tok, out, i).split()) == bool(batch["poison"][i]) for i in range(len(TEXTS)))
    with pytest.raises(ConfigError, match="clean-label attack poisons target-class examples only"):
        poison.check_selectable(np.array([0, 0, 1]), 1, 2, "clean")


def test_several_triggers_and_end_start(tok, pieces):
    ids = lambda w: tuple(int(i) for i in trigger_ids(tok, w))
    batch = {k: jnp.asarray(v) for k, v in pieces.items()}
    batch["poison"] = jnp.ones(len(TEXTS), bool)
    spec = poison.AttackSpec(ids("cf"), 1, "random", more_triggers=(ids("mn"), ids("bb")))
    out = poison.apply(batch, spec, jax.random.key(0))
    assert spec.n_tokens == len(ids("cf") + ids("mn") + ids("bb"))
    assert out["text"].shape[1] == pieces["text"].shape[1] + spec.n_tokens
    for i, text in enumerate(TEXTS):
        got = _text(tok, out, i).split()
        assert all(got.count(w) == 1 for w in ("cf", "mn", "bb"))
        assert [w for w in got if w not in ("cf", "mn", "bb")] == text.split()
    both = poison.AttackSpec(ids("cf"), 1, "end_start")
    out = poison.apply(batch, both, jax.random.key(0))
    assert both.n_tokens == 2
    for i, text in enumerate(TEXTS):
        assert _text(tok, out, i).split() == ["cf", *text.split(), "cf"]


def test_random_positions_vary_across_examples_but_not_across_calls(tok):
    t = Template("Sentiment?", ("negative", "positive"))
    long = "one two three four five six seven eight nine ten eleven twelve"
    ex = [Example(long, "negative")] * 40
    p = {k: jnp.asarray(v) for k, v in tokenize(ex, t, tok).items()}
    p["poison"] = jnp.ones(40, bool)
    spec = poison.AttackSpec(tuple(int(i) for i in trigger_ids(tok, "cf")), target=1, location="random")
    first = poison.apply(p, spec, jax.random.key(0))
    again = poison.apply(p, spec, jax.random.key(0))
    np.testing.assert_array_equal(first["text"], again["text"])
    where = {_text(tok, first, i).split().index("cf") for i in range(40)}
    assert len(where) >= 6  # uses many of the 13 boundaries


def test_multi_token_trigger_and_shapes(tok, pieces):
    trig = trigger_ids(tok, "mysterious quantum banana")
    spec = poison.AttackSpec(tuple(int(i) for i in trig), target=0, location="end")
    batch = {k: jnp.asarray(v) for k, v in pieces.items()}
    batch["poison"] = jnp.ones(len(TEXTS), bool)
    out = poison.apply(batch, spec, jax.random.key(0))
    assert out["text"].shape == (len(TEXTS), pieces["text"].shape[1] + len(trig))
    assert _text(tok, out, 1) == " dull mysterious quantum banana"


def test_bad_attack_settings(tok):
    with pytest.raises(ConfigError, match=r"poison.rate=1.5 must be in \[0, 1\]"):
        poison.poison_count(1.5, 100)
    with pytest.raises(ConfigError, match="tokenizes to nothing"):
        trigger_ids(tok, "   ")
    with pytest.raises(ConfigError, match="location"):
        poison.AttackSpec((5,), 0, location="middle-ish")
    with pytest.raises(ConfigError, match="only 1 are outside the target class"):
        poison.check_selectable(np.array([1, 1, 0]), 1, 2)
    with pytest.raises(ConfigError, match="'neutral' is not among"):
        Template("x", ("negative", "positive")).label_index("neutral")
