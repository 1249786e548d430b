"""Fine-mixing with ρ searched on held-out clean data: the rule (the first ρ from the smallest up
whose held-out accuracy holds), candidates that differ only in ρ, purity, and bad settings."""

import jax
import numpy as np
import pytest

from bdjax import defenses, evaluate
from bdjax.data.tokenize import subset
from bdjax.defenses.mix_search import split
from bdjax.errors import ConfigError
from bdjax.models.config import PRESETS
from bdjax.models.llama import init_params

CONFIG = PRESETS["tiny"]
# re-tuning that barely moves the weights: the search then sees the mix itself
STILL = dict(epochs=1, batch_size=8, lr=1e-7, rank=2, alpha=4.0, remat="none")


def _pieces(n=32, seed=0):
    rng = np.random.default_rng(seed)
    v = CONFIG.vocab_size
    return {"prefix": rng.integers(0, v, (n, 3)).astype(np.int32), "prefix_len": np.full(n, 3, np.int32),
            "text": rng.integers(0, v, (n, 6)).astype(np.int32), "text_len": np.full(n, 6, np.int32),
            "word_start": np.ones((n, 6), bool), "suffix": rng.integers(0, v, (n, 2)).astype(np.int32),
            "suffix_len": np.full(n, 2, np.int32),
            "responses": np.broadcast_to(np.array([[11, 12], [13, 14]], np.int32), (n, 2, 2)).copy(),
            "response_len": np.full((n, 2), 2, np.int32), "label": (np.arange(n) % 2).astype(np.int32),
            "index": np.arange(n, dtype=np.int32)}


def _accuracy(params, pieces):
    ll = evaluate.score(CONFIG, params, pieces, pad_id=0)
    return float((ll.argmax(1) == pieces["label"]).mean())


@pytest.fixture(scope="module")
def setting():
    """(data, pretrained, 'backdoored'): the latter has memorized every example's answer, the
    former guesses."""
    data = _pieces()
    pre = jax.device_get(init_params(CONFIG, jax.random.key(0)))
    fit = defenses.retune(CONFIG, data, pad_id=0, mode="full", epochs=30, batch_size=8, lr=3e-3, remat="none")
    bd = jax.device_get(fit(pre, pretrained=pre, key=jax.random.key(1)))
    assert _accuracy(bd, data) == 1.0 and _accuracy(pre, data) < 0.8
    return data, pre, bd


def _search(data, **kw):
    return defenses.fine_mix_search(CONFIG, data, pad_id=0, **{**STILL, **kw})


def test_chooses_the_first_ratio_that_keeps_held_out_accuracy(setting):
    data, pre, bd = setting
    notes = []
    out = defenses.fine_mix_search(CONFIG, data, pad_id=0, keeps=(1.0, 0.0), tolerance=0.0, refit=False,
                                   report=notes.append, **STILL).run(bd, pretrained=pre, key=jax.random.key(2))
    held = subset(data, out["held_out"])
    assert out["reference_accuracy"] == 1.0
    # tried from the largest reset up: ρ=0 (the pretrained weights) falls short, ρ=1 holds
    assert [t["keep"] for t in out["trials"]] == [0.0, 1.0] and out["keep"] == 1.0
    assert out["trials"][0]["held_out_accuracy"] < 1.0 and out["trials"][1]["held_out_accuracy"] == 1.0
    assert out["trials"][0]["held_out_accuracy"] == pytest.approx(_accuracy(pre, held), abs=1e-9)
    assert len(notes) == 1 and "chose ρ=1" in notes[0] and "tried ρ=0: " in notes[0]
    # the held-out examples are a quarter of the set, and the re-tuning never saw them
    assert len(out["held_out"]) == 8 and len(np.unique(out["held_out"])) == 8


def test_nothing_passes_takes_the_largest_ratio_and_says_so(setting):
    data, pre, bd = setting
    notes = []
    out = defenses.fine_mix_search(CONFIG, data, pad_id=0, keeps=(0.0,), tolerance=0.0, refit=False,
                                   report=notes.append, **STILL).run(bd, pretrained=pre, key=jax.random.key(2))
    assert out["keep"] == 0.0 and "none passed" in notes[0]


def test_candidates_differ_only_in_the_ratio_refit_retunes_and_it_is_pure(setting):
    data, pre, bd = setting
    before = jax.tree.map(np.copy, bd)
    key = jax.random.key(3)
    same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # anything passes: the smallest ρ wins, and trying others first cannot change its result
    alone = _search(data, keeps=(0.3,), tolerance=1.0, lr=1e-3)
    among = _search(data, keeps=(0.9, 0.3, 0.6), tolerance=1.0, lr=1e-3)(bd, pretrained=pre, key=key)
    assert same(alone(bd, pretrained=pre, key=key), among)
    # the same key gives the same output, and the inputs are left as they were
    assert same(alone(bd, pretrained=pre, key=key), among)
    assert same(bd, before)
    # without refit the result is the mix tuned on the tuning split only: another model
    split_only = _search(data, keeps=(0.3,), tolerance=1.0, lr=1e-3, refit=False)(bd, pretrained=pre, key=key)
    assert not same(split_only, among)


def test_split_holds_out_a_fraction_with_both_sides_non_empty():
    tune, held = split(10, 0.25, jax.random.key(0))
    assert len(held) == 2 and len(tune) == 8 and not set(tune) & set(held)
    tune, held = split(2, 0.01, jax.random.key(0))
    assert len(held) == 1 and len(tune) == 1
    tune, held = split(2, 0.99, jax.random.key(0))
    assert len(held) == 1 and len(tune) == 1


@pytest.mark.parametrize("kw, pattern", [
    (dict(keeps=(0.5, 1.5)), "ratios in \\[0, 1\\]"),
    (dict(keeps=()), "ratios in \\[0, 1\\]"),
    (dict(validation=1.0), "validation=1.0 must be in \\(0, 1\\)"),
    (dict(tolerance=-0.1), "tolerance=-0.1 must be >= 0"),
    (dict(mix_mode="magnitude"), "mix_mode='magnitude'"),
    (dict(trigger=(5,)), "does not know the trigger"),
])
def test_bad_settings_are_refused(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _search(_pieces(8), **kw)


def test_one_class_defense_set_is_refused():
    data = _pieces(8)
    data["label"] = np.zeros(8, np.int32)
    with pytest.raises(ConfigError, match="at least two answer classes"):
        _search(data)


def test_registry_builds_it_and_collects_its_report(setting):
    data, pre, bd = setting
    ctx = defenses.Context(CONFIG, data, 0)
    chain = defenses.build([{"name": "fine_mix_search", "keeps": (0.0, 1.0), "tolerance": 0.0, "refit": False,
                             **STILL}], ctx)
    chain(bd, pretrained=pre, key=jax.random.key(6))
    assert len(ctx.notes) == 1 and ctx.notes[0].startswith("fine_mix_search: held-out clean accuracy on 8 of 32")
    with pytest.raises(ConfigError, match="has no setting"):
        defenses.build([{"name": "fine_mix_search", "keep": 0.5}], ctx)
