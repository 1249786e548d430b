"""LoRA as a separate pytree: starts as the identity, merges exactly, and never forms a frozen-weight gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import lora, train
from bdjax.errors import ConfigError
from bdjax.models import ModelConfig, forward, init_params
from bdjax.models.layers import lora_delta, lora_merged
from bdjax.models.rows import apply_rows, causal_rows

# Distinctive sizes so a frozen kernel's shape cannot be mistaken for an activation's.
CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=12, tie_word_embeddings=False)
RANK = 5  # no token count of the tests below


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


@pytest.mark.parametrize("side_by_side", [True, False])
def test_merged_call_and_its_backward_equal_autodiff(side_by_side):
    keys = jax.random.split(jax.random.key(0), 5)
    x, w, a, b = (jax.random.normal(keys[0], (6, 5)), jax.random.normal(keys[1], (5, 7)),
                  jax.random.normal(keys[2], (3, 5)), jax.random.normal(keys[3], (3, 7)))
    g = jax.random.normal(keys[4], (6, 7))
    y, vjp = jax.vjp(lambda *t: lora_merged(2.0, side_by_side, *t), x, w, a, b)
    plain_y, plain_vjp = jax.vjp(lambda x, w, a, b: x @ w + 2.0 * (x @ a.T) @ b, x, w, a, b)
    np.testing.assert_allclose(y, plain_y, rtol=1e-5, atol=1e-5)
    for o, p in zip(vjp(g), plain_vjp(g)):
        np.testing.assert_allclose(o, p, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("side_by_side", [True, False])
def test_side_by_side_option_reaches_the_merged_calls(params, side_by_side):
    # Opts.lora_side_by_side: the merged MLP kernels [48, 80] carry LoRA's rank columns, [48, 80 + r],
    # only when asked; the loss is the same either way
    from bdjax.models.llama import Opts

    adapters = lora.init(params, jax.random.key(1), rank=RANK)
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    tokens = jax.random.randint(jax.random.key(3), (3, 40), 0, 97)
    rows = {"tokens": tokens, "valid": jnp.ones((3, 40), bool), "logits_at": jnp.tile(jnp.arange(39)[None], (3, 1)),
            "targets": tokens[:, 1:], "weights": jnp.ones((3, 39))}
    loss = lambda ad, flag: train.row_loss(CONFIG, params, ad, rows, Opts(lora_alpha=8.0, lora_side_by_side=flag),
                                           "none", None)[0]
    text = str(jax.make_jaxpr(jax.value_and_grad(lambda ad: loss(ad, side_by_side)))(adapters))
    assert (f"f32[48,{80 + RANK}]" in text) == side_by_side
    np.testing.assert_allclose(loss(adapters, side_by_side), loss(adapters, not side_by_side), rtol=1e-6)


@pytest.mark.parametrize("remat", ["none", "lean"])
def test_lora_merged_for_the_call_equals_lora_beside_the_kernel(params, monkeypatch, remat):
    from bdjax.models.layers import Proj
    from bdjax.models.llama import Opts

    adapters = lora.init(params, jax.random.key(1), rank=RANK, targets=lora.ALL_PROJECTIONS + "|lm_head")
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    tokens = jax.random.randint(jax.random.key(3), (3, 40), 0, 97)
    valid = jnp.arange(40)[None] < jnp.array([[40], [31], [12]])
    rows = {"tokens": tokens, "valid": valid, "logits_at": jnp.tile(jnp.arange(39)[None], (3, 1)),
            "targets": tokens[:, 1:], "weights": valid[:, 1:].astype(jnp.float32)}
    loss = lambda ad: train.row_loss(CONFIG, params, ad, rows, Opts(lora_alpha=8.0), remat, None)[0]
    merged = jax.value_and_grad(loss)(adapters)
    monkeypatch.setattr(Proj, "_merge", lambda self, x: False)
    beside = jax.value_and_grad(loss)(adapters)
    np.testing.assert_allclose(merged[0], beside[0], rtol=1e-6)
    jax.tree.map(lambda m, b: np.testing.assert_allclose(m, b, rtol=1e-4, atol=1e-6), merged[1], beside[1])
    assert float(jnp.abs(beside[1]["lm_head"]["b"]).max()) > 0


def test_merging_needs_float32_products_no_lora_dropout_and_enough_tokens(params):
    from bdjax.models.layers import Proj

    def merges(tokens, **kw):
        proj = Proj("bse,em->bsm", (48, 80), ("embed", "mlp"), **kw)
        variables = {"params": {"kernel": jnp.zeros((48, 80))}, "lora": {"a": jnp.zeros((4, 48)), "b": jnp.zeros((4, 80))}}
        return proj.apply(variables, jnp.zeros((1, tokens, 48)), method=lambda m, x: m._merge(x))

    assert merges(30) and not merges(29)  # 30·(48 + 80) >= 48·80 > 29·(48 + 80)
    assert not merges(64, matmul_dtype=jnp.bfloat16)
    assert not merges(64, dtype=jnp.bfloat16)
    assert not merges(64, lora_dropout=0.1, deterministic=False)
    assert merges(64, lora_dropout=0.1, deterministic=True)


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _products(hlo: str) -> set[tuple[tuple[int, ...], int]]:
    """(output shape, contracted size) of every compiled product."""
    products = set()
    for block in re.split(r"\n(?=\S)", hlo):  # one computation each; operand names are local to it
        defined = {m.group(1): _dims(m.group(2)) for m in re.finditer(r"%(\S+) = \w+\[([\d,]*)\]", block)}
        defined.update({m.group(1): _dims(m.group(2)) for m in re.finditer(r"(\w[\w.]*): \w+\[([\d,]*)\]", block)})
        for m in re.finditer(r"= f32\[([\d,]*)\]\S* dot\((?:\w+\[[\d,]*\]\S* )?%(\S+?), .*?"
                             r"lhs_contracting_dims=\{([\d,]*)\}", block):
            lhs = defined[m.group(2)]
            products.add((_dims(m.group(1)), int(np.prod([lhs[i] for i in _dims(m.group(3))]))))
    return products


def _dot_shapes(hlo: str, rank: int) -> set[tuple[int, ...]]:
    """Output shapes of the compiled products, leaving out those that contract over the LoRA rank
    (forming ΔW = AᵀB for a merged call has a kernel's shape but is no gradient of it)."""
    return {shape for shape, contracted in _products(hlo) if contracted != rank}


def _frozen_shapes(params) -> set[tuple[int, ...]]:
    out = set()
    for leaf in jax.tree.leaves(params):
        if leaf.ndim >= 2:
            out.add(tuple(leaf.shape))
            out.add(tuple(leaf.shape[1:]))  # one layer of a stacked kernel
            out.add(tuple(reversed(leaf.shape[1:])))
    return {s for s in out if len(s) >= 2}


def _compiled_grad(params, wrt_lora: bool, matmul_dtype=None, seq: int = 8) -> str:
    adapters = lora.init(params, jax.random.key(1), rank=RANK)
    tokens = jnp.arange(2 * seq).reshape(2, seq) % 97
    rows = {"tokens": tokens, "valid": jnp.ones((2, seq), bool), "logits_at": jnp.tile(jnp.arange(seq - 2, seq), (2, 1)),
            "targets": tokens[:, :2], "weights": jnp.ones((2, 2))}
    from bdjax.models.llama import Opts

    opts = Opts(matmul_dtype=matmul_dtype)
    if wrt_lora:
        fn = jax.grad(lambda ad: train.row_loss(CONFIG, params, ad, rows, opts, "none", None)[0])
        return jax.jit(fn).lower(adapters).compile().as_text()
    fn = jax.grad(lambda p: train.row_loss(CONFIG, p, adapters, rows, opts, "none", None)[0])
    return jax.jit(fn).lower(params).compile().as_text()


# 2 x 8 tokens run LoRA beside the kernel (lora_delta); 2 x 36 merge it into the kernel for the
# call (lora_merged), except in bfloat16 products.
@pytest.mark.parametrize("matmul_dtype, seq", [(None, 8), (None, 36), (jnp.bfloat16, 36)])
def test_compiled_lora_gradient_forms_no_frozen_weight_gradient(params, matmul_dtype, seq):
    frozen = _frozen_shapes(params)
    lora_grad = _compiled_grad(params, True, matmul_dtype, seq)
    assert not _dot_shapes(lora_grad, RANK) & frozen
    merged = any(shape in frozen and contracted == RANK for shape, contracted in _products(lora_grad))  # ΔW = AᵀB
    assert merged == (seq == 36 and matmul_dtype is None)
    # The check can fail: differentiating the base weights does produce such products.
    assert _dot_shapes(_compiled_grad(params, False, matmul_dtype, seq), RANK) & frozen


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
