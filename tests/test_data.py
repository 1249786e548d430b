"""Sources, the shared template and tokenization into pieces."""

import json

import numpy as np
import pytest

from bdjax.data import sources
from bdjax.data.templates import Template
from bdjax.data.tokenize import encode_words, tokenize
from bdjax.errors import ConfigError


@pytest.mark.slow
def test_bundled_domains_and_fixed_splits():
    movie = sources.load("movie")
    assert len(movie) == 10568  # 10,605 rated snippets minus those rated exactly 0
    assert {e.label for e in movie} == {"negative", "positive"}
    a = sources.split(movie, seed=0, test_fraction=0.2)
    b = sources.split(movie, seed=0, test_fraction=0.2)
    assert a == b and len(a[1]) == round(0.2 * len(movie))
    assert not {e.text for e in a[0][:500]} & {e.text for e in a[1]}
    for domain in ("amazon", "tweets", "nyt"):
        assert len(sources.load(domain)) > 3000


def test_balanced_take():
    ex = [sources.Example(str(i), "pos" if i % 3 else "neg") for i in range(90)]
    got = sources.take(ex, 20, seed=0, labels=("neg", "pos"), balanced=True)
    assert sorted(e.label for e in got) == ["neg"] * 10 + ["pos"] * 10


def test_local_jsonl_and_csv(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"sentence": f"s{i}", "y": "a"}) for i in range(3)))
    assert sources.load(str(tmp_path / "d.jsonl"), text_field="sentence", label_field="y")[2].text == "s2"
    (tmp_path / "d.csv").write_text("text,label\nhello,b\n")
    assert sources.load(str(tmp_path / "d.csv")) == [sources.Example("hello", "b")]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="holds no examples"):
        sources.load(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ConfigError, match="lacks field 'text'"):
        sources.load(str(tmp_path / "d.jsonl"))


def test_template_pieces_match_the_chat_rendering(default_model):
    tok = default_model.tokenizer
    t = Template("Is it positive or negative?", ("negative", "positive"), system="Be brief.")
    before, after, answers = t.pieces(tok)
    assert before + "great film" + after == t.render(tok, "great film")
    assert answers == ["negative<|im_end|>", "positive<|im_end|>"]
    assert t.render(tok, "x", answer="positive").startswith(t.render(tok, "x"))
    plain = Template("Q?", ("no", "yes"), chat=False)
    b, a, ans = plain.pieces(tok)
    assert b.endswith("### Input:\n") and a.startswith("\n\n### Response:") and ans[1].startswith("yes")


def test_tokenized_pieces_mark_word_starts(default_model):
    tok = default_model.tokenizer
    ids, starts = encode_words(tok, "unbelievably  good,   truly", 100)
    words = [tok.decode(ids[i:j]) for i, j in zip(
        [k for k, s in enumerate(starts) if s], [k for k, s in enumerate(starts) if s][1:] + [len(ids)])]
    assert words == [" unbelievably", " good,", " truly"]
    p = tokenize([sources.Example("a b", "negative"), sources.Example("ccc", "positive")],
                 Template("Q", ("negative", "positive")), tok)
    assert p["label"].tolist() == [0, 1] and p["responses"].shape[:2] == (2, 2)
    assert np.all(p["prefix"][0] == p["prefix"][1])
    with pytest.raises(ConfigError, match="empty"):
        tokenize([], Template("Q", ("negative", "positive")), tok)


def test_fit_to_length_truncates_text_or_refuses():
    from bdjax.data.tokenize import fit_to_length
    from bdjax.errors import ConfigError

    pieces = {"prefix_len": np.array([5, 5]), "suffix_len": np.array([2, 2]), "text_len": np.array([10, 3]),
              "response_len": np.array([[2, 1], [2, 1]]), "text": np.zeros((2, 10), np.int32),
              "word_start": np.ones((2, 10), bool), "index": np.array([0, 1])}
    assert fit_to_length(pieces, 20, 1) is pieces  # 5 + 10 + 2 + 2 + 1 = 20 fits
    with pytest.raises(ConfigError, match="example 0 needs 21 tokens"):
        fit_to_length(pieces, 20, 2)
    out = fit_to_length(pieces, 20, 2, policy="truncate")
    assert out["text_len"].tolist() == [9, 3] and out["word_start"][0].sum() == 9
    with pytest.raises(ConfigError, match="leaves no room"):
        fit_to_length(pieces, 11, 2, policy="truncate")
