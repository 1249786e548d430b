"""LoRA as a separate pytree: starts as the identity, merges exactly, and never forms a frozen-weight gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import lora, train
from bdjax.errors import ConfigError
from bdjax.models import ModelConfig, forward, init_params
from bdjax.models.layers import lora_delta
from bdjax.models.rows import apply_rows, causal_rows

# Distinctive sizes so a frozen kernel's shape cannot be mistaken for an activation's.
CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=12, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _logits(params, tokens, adapters=None, alpha=16.0):
    from bdjax.models.llama import Opts

    valid = jnp.ones(tokens.shape, bool)
    pos, mask = causal_rows(CONFIG, valid)
    return apply_rows(CONFIG, params, tokens, pos, mask, lora=adapters, opts=Opts(lora_alpha=alpha))


def test_fresh_adapters_leave_the_model_unchanged(params):
    adapters = lora.init(params, jax.random.key(1), rank=4)
    tokens = jnp.arange(10)[None] % 97
    np.testing.assert_array_equal(_logits(params, tokens, adapters), forward(CONFIG, params, tokens))
    assert set(adapters["layers"]["attn"]) == {"q", "k", "v", "o"}
    assert adapters["layers"]["attn"]["o"]["a"].shape == (2, 4, 4, 12)  # [layers, r, heads, head_dim]


def test_unmerged_equals_merged(params):
    adapters = lora.init(params, jax.random.key(1), rank=4, targets=r"layers/(attn/(q|o)|mlp/down)|lm_head")
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    tokens = jnp.arange(12)[None] % 97
    merged = lora.merge(params, adapters, alpha=8.0)
    np.testing.assert_allclose(_logits(params, tokens, adapters, alpha=8.0), forward(CONFIG, merged, tokens),
                               atol=1e-4)
    assert not np.allclose(forward(CONFIG, merged, tokens), forward(CONFIG, params, tokens), atol=1e-3)


def test_custom_backward_equals_autodiff():
    keys = jax.random.split(jax.random.key(0), 4)
    x, a, b = (jax.random.normal(keys[0], (6, 5)), jax.random.normal(keys[1], (3, 5)),
               jax.random.normal(keys[2], (3, 7)))
    g = jax.random.normal(keys[3], (6, 7))
    ours = jax.vjp(lambda *t: lora_delta(2.0, *t), x, a, b)[1](g)
    plain = jax.vjp(lambda x, a, b: 2.0 * (x @ a.T) @ b, x, a, b)[1](g)
    for o, p in zip(ours, plain):
        np.testing.assert_allclose(o, p, rtol=1e-5, atol=1e-5)


def _dot_shapes(hlo: str) -> set[tuple[int, ...]]:
    shapes = set()
    for m in re.finditer(r"= f32\[([\d,]*)\][^=]*? dot\(", hlo):
        shapes.add(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def _frozen_shapes(params) -> set[tuple[int, ...]]:
    out = set()
    for leaf in jax.tree.leaves(params):
        if leaf.ndim >= 2:
            out.add(tuple(leaf.shape))
            out.add(tuple(leaf.shape[1:]))  # one layer of a stacked kernel
            out.add(tuple(reversed(leaf.shape[1:])))
    return {s for s in out if len(s) >= 2}


def _compiled_grad(params, wrt_lora: bool, matmul_dtype=None) -> str:
    adapters = lora.init(params, jax.random.key(1), rank=4)
    tokens = jnp.arange(16).reshape(2, 8) % 97
    rows = {"tokens": tokens, "valid": jnp.ones((2, 8), bool), "logits_at": jnp.tile(jnp.arange(6, 8), (2, 1)),
            "targets": tokens[:, :2], "weights": jnp.ones((2, 2))}
    from bdjax.models.llama import Opts

    opts = Opts(matmul_dtype=matmul_dtype)
    if wrt_lora:
        fn = jax.grad(lambda ad: train.row_loss(CONFIG, params, ad, rows, opts, "none", None)[0])
        return jax.jit(fn).lower(adapters).compile().as_text()
    fn = jax.grad(lambda p: train.row_loss(CONFIG, p, adapters, rows, opts, "none", None)[0])
    return jax.jit(fn).lower(params).compile().as_text()


@pytest.mark.parametrize("matmul_dtype", [None, jnp.bfloat16])
def test_compiled_lora_gradient_forms_no_frozen_weight_gradient(params, matmul_dtype):
    frozen = _frozen_shapes(params)
    assert not _dot_shapes(_compiled_grad(params, True, matmul_dtype)) & frozen
    # The check can fail: differentiating the base weights does produce such products.
    assert _dot_shapes(_compiled_grad(params, False, matmul_dtype)) & frozen


def test_targets_that_match_nothing_are_an_error(params):
    with pytest.raises(ConfigError, match="matches no projection"):
        lora.init(params, jax.random.key(0), rank=4, targets=r"layers/attn/qq")
    with pytest.raises(ConfigError, match="rank=0"):
        lora.init(params, jax.random.key(0), rank=0)


def test_token_nll_equals_log_softmax_and_its_gradient():
    keys = jax.random.split(jax.random.key(0), 3)
    logits = 4 * jax.random.normal(keys[0], (3, 5, 50))
    targets = jax.random.randint(keys[1], (3, 5), 0, 50)
    weights = jax.random.uniform(keys[2], (3, 5))

    def reference(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights).sum()

    ours = lambda logits: train.answer_nll(logits, targets, weights)[0]
    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-6)
