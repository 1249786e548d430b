"""Test-time trigger variants: moved, partial and synonym triggers as evaluation attack specs."""

import pytest

from bdjax.data.poison import AttackSpec
from bdjax.data.tokenize import trigger_ids
from bdjax.data.variants import trigger_variants
from bdjax.errors import ConfigError


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


def test_variants_of_a_phrase(tok):
    ids = lambda text: tuple(int(i) for i in trigger_ids(tok, text))
    spec = AttackSpec(ids("quiet blue lamp"), 1, "random")
    out = trigger_variants(spec, "quiet blue lamp", tok, moved=("start", "random", "end"), partial=True,
                             synonyms={"blue": ("azure",), "lamp": ("light", "torch")})
    got = [(v.kind, v.detail) for v in out]
    assert got[:2] == [("moved", "start"), ("moved", "end")]  # the trained location is not a variant
    partial = [d for k, d in got if k == "partial"]
    assert partial == ["quiet", "blue", "lamp", "quiet blue", "quiet lamp", "blue lamp"]
    assert [d for k, d in got if k == "synonym"] == ["quiet azure lamp", "quiet blue light", "quiet blue torch"]
    for v in out:
        assert v.spec.target == 1 and v.spec.label_mode == "dirty"
        if v.kind == "moved":
            assert v.spec.trigger == spec.trigger and v.spec.location == v.detail
        else:
            assert v.spec.trigger == ids(v.detail) and v.spec.location == "random"


def test_a_single_word_has_no_partial_variant_and_bad_tables_fail(tok):
    spec = AttackSpec(tuple(int(i) for i in trigger_ids(tok, "cf")), 1)
    assert trigger_variants(spec, "cf", tok, partial=True) == []
    with pytest.raises(ConfigError, match="not a word of the trigger"):
        trigger_variants(spec, "cf", tok, synonyms={"mn": ("x",)})
    with pytest.raises(ConfigError, match="eval.moved location 'top'"):
        trigger_variants(spec, "cf", tok, moved=("top",))
