"""SANDE on a tiny model: soft-prompt rows act as input embeddings, the parrot learns to elicit the
backdoor's answer with the model frozen, and the whole defense is a pure transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import defenses
from bdjax.data import assemble
from bdjax.errors import ConfigError
from bdjax.models.config import PRESETS
from bdjax.models.llama import SOFT_PROMPT, init_params, soft_token_ids
from bdjax.models.rows import forward

from test_retune import _pieces

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def params():
    return jax.device_get(init_params(CONFIG, jax.random.key(0)))


def test_soft_prompt_rows_are_read_as_input_embeddings(params):
    tokens = np.array([[5, 9, 17, 3]], np.int32)
    soft = {**params, SOFT_PROMPT: params["embedding"][np.array([9, 17])]}
    v = CONFIG.vocab_size
    assert soft_token_ids(CONFIG, 2) == (v, v + 1)
    mixed = np.array([[5, v, v + 1, 3]], np.int32)
    np.testing.assert_allclose(forward(CONFIG, soft, mixed), forward(CONFIG, params, tokens), atol=1e-6)
    # the output head keeps the vocabulary: soft tokens are never predicted
    assert forward(CONFIG, soft, mixed).shape[-1] == v


def test_answer_tokens_limits_the_loss_to_the_answer_start():
    batch = jax.tree.map(jnp.asarray, _pieces(4))
    full = assemble.training_rows(batch, 16, 0)
    first = assemble.training_rows(batch, 16, 0, answer_tokens=1)
    assert float(full["weights"].sum()) == 8 and float(first["weights"].sum()) == 4
    np.testing.assert_array_equal(first["weights"][:, 0], full["weights"][:, 0])


def _with_target_answer(data):
    """Class 1 answers with the same two tokens everywhere (a target label)."""
    responses = data["responses"].copy()
    responses[:, 1] = [7, 11]
    return {**data, "responses": responses}


def _sande(data, **kw):
    settings = dict(pad_id=0, epochs=1, batch_size=8, lr=1e-3, rank=4, alpha=8.0, remat="none")
    parrot = defenses.ParrotSettings(tokens=3, epochs=6, lr=5e-2, answer_tokens=0, remat="none")
    return defenses.sande(CONFIG, data, 1, parrot=parrot, **{**settings, **kw})


def test_parrot_learns_to_elicit_the_target_answer_with_the_model_frozen(params):
    data = _with_target_answer(_pieces(32, seed=2))
    before = jax.tree.map(np.copy, params)
    out = _sande(data).run(params, pretrained=params, key=jax.random.key(0))
    losses = [e["loss"] for e in out["parrot_log"]]
    assert np.mean(losses[-4:]) < losses[0] - 0.15  # the zero-initialised parrot's loss comes first
    assert out["parrot"].shape == (3, CONFIG.hidden_size)
    assert set(out["params"]) == set(params)  # the parrot is not part of the cleaned model
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)  # inputs untouched


def test_sande_is_a_pure_transform(params):
    data = _pieces(16, seed=3)
    t = _sande(data)
    a = t(params, pretrained=params, key=jax.random.key(1))
    b = t(params, pretrained=params, key=jax.random.key(1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a),
                                                                               jax.tree.leaves(params)))


def test_bad_settings_are_config_errors():
    data = _pieces(8)
    with pytest.raises(ConfigError, match="not one of the data's 2 answers"):
        defenses.sande(CONFIG, data, 2, pad_id=0)
    with pytest.raises(ConfigError, match="use osft"):
        defenses.sande(CONFIG, data, 1, pad_id=0, trigger=(3,))
    with pytest.raises(ConfigError, match="parrot_tokens"):
        defenses.ParrotSettings(tokens=0)
    only_target = {**data, "label": np.ones(8, np.int32)}
    with pytest.raises(ConfigError, match="outside the target class"):
        defenses.learn_parrot(CONFIG, {}, only_target, target=1, pad_id=0, settings=defenses.ParrotSettings(),
                              key=jax.random.key(0))
