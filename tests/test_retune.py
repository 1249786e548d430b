"""Re-tuning defenses on a tiny model: regularized steps are exact under accumulation, Obliviate's
attention term spreads attention, and the transform is deterministic."""

import jax
import numpy as np
import pytest

from bdjax import defenses, loop, lora, train
from bdjax.models.config import PRESETS
from bdjax.models.llama import init_params
from bdjax.regularize import Regularizer, anchor_tree

CONFIG = PRESETS["tiny"]


def _pieces(n=16, seed=0):
    rng = np.random.default_rng(seed)
    v = CONFIG.vocab_size
    return {"prefix": rng.integers(0, v, (n, 3)).astype(np.int32), "prefix_len": np.full(n, 3, np.int32),
            "text": rng.integers(0, v, (n, 6)).astype(np.int32), "text_len": rng.integers(2, 7, n).astype(np.int32),
            "word_start": np.ones((n, 6), bool), "suffix": rng.integers(0, v, (n, 2)).astype(np.int32),
            "suffix_len": np.full(n, 2, np.int32), "responses": rng.integers(0, v, (n, 2, 2)).astype(np.int32),
            "response_len": np.full((n, 2), 2, np.int32), "label": rng.integers(0, 2, n).astype(np.int32),
            "index": np.arange(n, dtype=np.int32)}


@pytest.fixture(scope="module")
def params():
    return jax.device_get(init_params(CONFIG, jax.random.key(0)))


def _one_step(params, reg, accum):
    pre = jax.tree.map(lambda x: x + 0.01, params)
    lo = jax.tree.map(lambda x: x + 0.01, lora.init(params, jax.random.key(1), rank=4))  # B != 0: every term live
    opt = train.make_optimizer(lr=1e-3, total_steps=4)
    step = train.make_train_step(CONFIG, opt, pad_id=0, spec=None, poison_key=jax.random.key(2), alpha=8.0,
                                 trainable=lo, params=params, reg=reg, anchor=anchor_tree(pre, params, lo),
                                 grad_accum=accum)
    state = step.init_state(lo, jax.random.key(3))
    state, log = loop.fit(step, state, params, _pieces(), batch_size=8, epochs=1, seed=0)
    return jax.device_get(state.trainable), log


def test_regularized_step_is_the_same_with_gradient_accumulation(params):
    reg = Regularizer(l2=0.5, amplify=1e-2, attention=1e-1)
    a, log_a = _one_step(params, reg, 1)
    b, log_b = _one_step(params, reg, 2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
    assert log_a[0]["penalty"] == pytest.approx(log_b[0]["penalty"], rel=1e-5)
    assert log_a[0]["attn_concentration"] == pytest.approx(log_b[0]["attn_concentration"], rel=1e-5)
    plain, _ = _one_step(params, None, 1)
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(plain)))


def test_attention_term_spreads_the_summary_rows_attention(params):
    # sharpen the random model's attention (large queries) so that there is concentration to undo
    params = jax.tree.map(lambda x: x, params)
    params["layers"]["attn"]["q"] = {"kernel": params["layers"]["attn"]["q"]["kernel"] * 40.0}
    data = _pieces(32, seed=1)
    common = dict(pad_id=0, epochs=4, batch_size=8, lr=5e-3, rank=4, alpha=8.0, remat="none")
    plain = defenses.retune(CONFIG, data, **common).run(params, pretrained=params, key=jax.random.key(0))
    spread = defenses.retune(CONFIG, data, attention=1.0, **common).run(params, pretrained=params,
                                                                           key=jax.random.key(0))
    assert "attn_concentration" in spread["log"][0] and "attn_concentration" not in plain["log"][0]
    assert _concentration(spread["params"], data) < _concentration(plain["params"], data) - 0.01


def _concentration(params, data):
    import jax.numpy as jnp

    from bdjax.data import assemble
    from bdjax.models.rows import apply_rows, causal_rows

    rows = assemble.training_rows(jax.tree.map(jnp.asarray, data), 16, 0)
    positions, mask = causal_rows(CONFIG, rows["valid"])
    _, conc = apply_rows(CONFIG, params, rows["tokens"], positions, mask, logits_at=rows["logits_at"],
                         summary_at=rows["logits_at"][:, 0])
    return float(conc.mean())


def test_retune_is_deterministic_and_leaves_its_inputs_alone(params):
    data = _pieces(16, seed=2)
    before = jax.tree.map(np.copy, params)
    t = defenses.obliviate(CONFIG, data, pad_id=0, epochs=1, batch_size=8, rank=4)
    a = t(params, pretrained=params, key=jax.random.key(7))
    b = t(params, pretrained=params, key=jax.random.key(7))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), z) for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(params)))
    for x, z in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(x, z)


def test_full_retune_with_l2_moves_toward_the_pretrained_weights(params):
    data = _pieces(16, seed=3)
    pre = jax.tree.map(lambda x: x + 0.05, params)
    dist = lambda p: sum(float(np.sum((np.asarray(a) - b) ** 2)) for a, b in zip(jax.tree.leaves(p),
                                                                                 jax.tree.leaves(pre)))
    common = dict(pad_id=0, mode="full", epochs=2, batch_size=8, lr=1e-3)
    free = defenses.retune(CONFIG, data, **common)(params, pretrained=pre, key=jax.random.key(0))
    pulled = defenses.retune(CONFIG, data, l2=1.0, **common)(params, pretrained=pre, key=jax.random.key(0))
    assert dist(pulled) < dist(free) - 1.0


def test_osft_trains_on_triggered_inputs_with_their_true_answers(params):
    data = _pieces(16, seed=4)
    common = dict(pad_id=0, epochs=1, batch_size=8, rank=4)
    plain = defenses.retune(CONFIG, data, **common).run(params, pretrained=params, key=jax.random.key(0))
    osft = defenses.osft(CONFIG, data, (5, 6), **common).run(params, pretrained=params, key=jax.random.key(0))
    # every example carries the 2-token trigger; the answer tokens (targets) are the same ones
    assert sum(e["tokens"] for e in osft["log"]) == sum(e["tokens"] for e in plain["log"]) + 2 * 16
    assert sum(e["answer_tokens"] for e in osft["log"]) == sum(e["answer_tokens"] for e in plain["log"])
    half = defenses.osft(CONFIG, data, (5, 6), trigger_fraction=0.5, **common).run(params, pretrained=params,
                                                                                   key=jax.random.key(0))
    assert sum(e["tokens"] for e in half["log"]) == sum(e["tokens"] for e in plain["log"]) + 2 * 8
