"""Sequence assembly: training rows and the one-pass scoring tree agree with plain full sequences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.data import assemble
from bdjax.models import ModelConfig, forward, init_params
from bdjax.models.cache import prefix_kv
from bdjax.models.rows import apply_rows

CONFIG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)


def _pieces():
    rng = np.random.default_rng(0)
    b = 3
    return {
        "prefix": jnp.asarray(rng.integers(3, 64, (b, 4))), "prefix_len": jnp.array([4, 4, 4]),
        "text": jnp.asarray(rng.integers(3, 64, (b, 7))), "text_len": jnp.array([7, 2, 5]),
        "suffix": jnp.asarray(rng.integers(3, 64, (b, 2))), "suffix_len": jnp.array([2, 2, 2]),
        "responses": jnp.asarray(rng.integers(3, 64, (b, 3, 3))),
        "response_len": jnp.array([[2, 3, 1], [2, 3, 1], [2, 3, 1]]),
        "label": jnp.array([0, 1, 2]),
    }


def _prompt(p, i):
    return np.concatenate([np.asarray(p[k][i])[:int(p[k + "_len"][i])] for k in ("prefix", "text", "suffix")])


def test_concat_lays_segments_end_to_end():
    ids = [jnp.array([[1, 2, 0], [3, 0, 0]]), jnp.array([[7, 8], [9, 9]])]
    lens = [jnp.array([2, 1]), jnp.array([2, 1])]
    tokens, seg, starts = assemble.concat(list(zip(ids, lens)), 5, pad_id=0)
    assert tokens.tolist() == [[1, 2, 7, 8, 0], [3, 9, 0, 0, 0]]
    assert seg.tolist() == [[0, 0, 1, 1, -1], [0, 1, -1, -1, -1]]
    assert starts.tolist() == [[0, 2], [0, 1]]


def test_training_rows_target_the_answer_only():
    p = _pieces()
    rows = assemble.training_rows(p, 16, pad_id=0)
    for i in range(3):
        prompt = _prompt(p, i)
        answer = np.asarray(p["responses"][i, int(p["label"][i])])[:int(p["response_len"][i, int(p["label"][i])])]
        full = np.concatenate([prompt, answer])
        assert np.asarray(rows["tokens"][i])[:len(full)].tolist() == full.tolist()
        assert int(rows["valid"][i].sum()) == len(full)
        w = np.asarray(rows["weights"][i]).astype(bool)
        at = np.asarray(rows["logits_at"][i])[w]
        assert full[at + 1].tolist() == answer.tolist()  # the logit at `at` predicts the next token


@pytest.mark.parametrize("window", [None, 4], ids=["full", "sliding-window-4"])
def test_scoring_tree_equals_separate_sequences(window):
    """Also under a sliding window shorter than the prompts (Mistral), where answer branches side
    by side must count the window in positions, not slots."""
    config = dataclasses.replace(CONFIG, sliding_window=window)
    params = init_params(config, jax.random.key(0))
    p = _pieces()
    rows = assemble.scoring_rows(p, 24, pad_id=0, sliding_window=window)
    b, c, r = rows["targets"].shape
    logits = apply_rows(config, params, rows["tokens"], rows["positions"], rows["mask"],
                        logits_at=rows["logits_at"].reshape(b, c * r))
    logp = jax.nn.log_softmax(logits.reshape(b, c, r, -1), -1)
    tree = (jnp.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0] * rows["weights"]).sum(-1)
    for i in range(b):
        for cls in range(c):
            answer = np.asarray(p["responses"][i, cls])[:int(p["response_len"][i, cls])]
            full = np.concatenate([_prompt(p, i), answer])
            lp = jax.nn.log_softmax(forward(config, params, jnp.asarray(full)[None])[0], -1)
            n = len(_prompt(p, i))
            expected = sum(float(lp[n - 1 + k, answer[k]]) for k in range(len(answer)))
            np.testing.assert_allclose(float(tree[i, cls]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "sliding-window-5"])
@pytest.mark.parametrize("packed", [False, True], ids=["prefix-kv", "packed"])
def test_scoring_with_a_shared_prefix_run_once_equals_the_full_tree(packed, window):
    """The prefix run once, either on its own (its keys/values read by every row) or laid end to
    end with the rows in one pass, scores as if it were in every row (also under a sliding
    window that reaches back into the prefix)."""
    config = dataclasses.replace(CONFIG, sliding_window=window)
    params = init_params(config, jax.random.key(0))
    p = _pieces()
    p["prefix"] = jnp.tile(p["prefix"][:1], (3, 1))  # a template prefix: the same in every example
    assert assemble.shared_prefix_length(p, minimum=1) == 4
    assert assemble.shared_prefix_length(p) == 0  # 4 tokens are not worth a separate pass by default

    def tree(shared):
        rows = assemble.scoring_rows(p, 24 - shared, pad_id=0, shared_prefix=shared, sliding_window=window)
        b, c, r = rows["targets"].shape
        prefix = p["prefix"][0, :shared] if shared else None
        kv = prefix_kv(config, params, prefix) if shared and not packed else None
        logits = apply_rows(config, params, rows["tokens"], rows["positions"], rows["mask"],
                            logits_at=rows["logits_at"].reshape(b, c * r), prefix=kv,
                            prefix_tokens=prefix if packed else None)
        logp = jax.nn.log_softmax(logits.reshape(b, c, r, -1), -1)
        return (jnp.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0] * rows["weights"]).sum(-1)

    full = tree(0)
    for shared in (1, 3, 4):  # the whole prefix, or part of it with the rest left in the rows
        np.testing.assert_allclose(tree(shared), full, rtol=1e-5, atol=1e-5)


def test_shared_prefix_length_stops_where_examples_differ():
    p = {k: np.asarray(v) for k, v in _pieces().items()}
    p["prefix"] = np.tile(np.arange(10, 20), (3, 1))
    p["prefix_len"] = np.full(3, 10)
    assert assemble.shared_prefix_length(p) == 10
    p["prefix"][1, 9] = 0
    assert assemble.shared_prefix_length(p) == 9
    p["prefix"][2, 3] = 0
    assert assemble.shared_prefix_length(p) == 0  # 3 shared tokens: below the default minimum of 8


def test_evaluate_scores_the_same_with_the_prefix_run_once():
    """`evaluate.score` runs a template prefix (10 tokens, shared by every example) once per batch,
    in the rows' pass: the same log-likelihoods as with the prefix in every row."""
    from bdjax import evaluate
    params = init_params(CONFIG, jax.random.key(0))
    p = {k: np.asarray(v) for k, v in _pieces().items()}
    p["prefix"] = np.tile(np.arange(10, 20), (3, 1))
    p["prefix_len"] = np.full(3, 10)
    assert assemble.shared_prefix_length(p) == 10
    once = evaluate.score(CONFIG, params, p, pad_id=0, batch_size=2, share_prefix=True)
    every = evaluate.score(CONFIG, params, p, pad_id=0, batch_size=2, share_prefix=False)
    assert once.shape == (3, 3)
    np.testing.assert_allclose(once, every, rtol=1e-5, atol=1e-5)
