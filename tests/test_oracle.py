"""The Flax model agrees with Hugging Face transformers' PyTorch implementation (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

import bdjax
from conftest import FAMILIES, torch_logits

TOL = 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(hf_dirs, family):
    path, torch_model = hf_dirs[family]
    model = bdjax.load(path)
    tokens = np.random.default_rng(1).integers(0, 260, (2, 24))
    ours = np.asarray(model.apply(model.params, jnp.asarray(tokens)))
    theirs = torch_logits(torch_model, tokens)
    assert ours.shape == theirs.shape == (2, 24, 260)
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_left_padded_logits_match_transformers(hf_dirs, family):
    """Padding changes positions and masks; real tokens must get the same logits as HF's."""
    path, torch_model = hf_dirs[family]
    model = bdjax.load(path)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 260, (3, 20))
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    mask[1, :11] = 0
    ours = np.asarray(model.apply(model.params, jnp.asarray(tokens), jnp.asarray(mask)))
    theirs = torch_logits(torch_model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours - theirs)[real].max() <= TOL


def test_sliding_window_is_applied(hf_dirs):
    """Mistral's window (6) must matter at length 24: without it the logits would differ."""
    import dataclasses

    path, _ = hf_dirs["mistral"]
    model = bdjax.load(path)
    assert model.config.sliding_window == 6
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 260, (1, 24)))
    full = bdjax.make_model(dataclasses.replace(model.config, sliding_window=None), model.params)
    windowed = np.asarray(model.apply(model.params, tokens))
    unwindowed = np.asarray(full.apply(full.params, tokens))
    assert np.allclose(windowed[:, :6], unwindowed[:, :6], atol=1e-6)
    assert np.abs(windowed[:, 6:] - unwindowed[:, 6:]).max() > 1e-3
