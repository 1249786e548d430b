"""Weight products with bfloat16 operands and float32 sums (`Opts.matmul_dtype`): the forward and
both gradients are the rounded operands' exact products, and a LoRA train step stays close to the
float32 one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import lora, train
from bdjax.models import ModelConfig, init_params
from bdjax.models.layers import Opts, matmul, mixed_einsum

BF16 = jnp.bfloat16
CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=12, tie_word_embeddings=True)


def _round(x):
    return x.astype(BF16).astype(jnp.float32)


@pytest.mark.parametrize("spec, xs, ws", [("bse,ehd->bshd", (2, 5, 8), (8, 3, 4)),
                                          ("bshd,hde->bse", (2, 5, 3, 4), (3, 4, 8)),
                                          ("bse,ve->bsv", (2, 5, 8), (11, 8))])
def test_forward_and_gradients_are_products_of_rounded_operands(spec, xs, ws):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    y, vjp = jax.vjp(lambda x, w: mixed_einsum(spec, jnp.dtype(BF16), x, w), x, w)
    assert y.dtype == jnp.float32
    hi = jax.lax.Precision.HIGHEST
    np.testing.assert_allclose(y, jnp.einsum(spec, _round(x), _round(w), precision=hi), rtol=1e-6, atol=1e-6)
    g = jax.random.normal(kg, y.shape)
    dx, dw = vjp(g)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    _, ref = jax.vjp(lambda x, w: jnp.einsum(spec, x, w, precision=hi), _round(x), _round(w))
    rdx, rdw = ref(_round(g))
    np.testing.assert_allclose(dx, rdx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, rdw, rtol=1e-6, atol=1e-6)
    # and not the float32 products: the rounding is really there
    _, exact = jax.vjp(lambda x, w: jnp.einsum(spec, x, w, precision=hi), x, w)
    assert not np.allclose(dx, exact(g)[0], rtol=1e-5, atol=1e-5)


def test_matmul_without_a_distinct_dtype_is_the_plain_product():
    x, w = jax.random.normal(jax.random.key(0), (3, 8)), jax.random.normal(jax.random.key(1), (8, 5))
    np.testing.assert_array_equal(matmul("te,ef->tf", x, w, jnp.float32, jnp.float32), jnp.einsum("te,ef->tf", x, w))
    np.testing.assert_array_equal(matmul("te,ef->tf", x, w, jnp.float32, None), jnp.einsum("te,ef->tf", x, w))


def test_lora_step_close_to_float32():
    params = init_params(CONFIG, jax.random.key(0))
    adapters = jax.tree.map(lambda a: a + 0.05, lora.init(params, jax.random.key(1), rank=4))  # B != 0: A gets a gradient
    tokens = jnp.arange(24).reshape(2, 12) % 97
    rows = {"tokens": tokens, "valid": jnp.ones((2, 12), bool), "logits_at": jnp.tile(jnp.arange(11), (2, 1)),
            "targets": tokens[:, 1:], "weights": jnp.ones((2, 11))}

    def loss_grad(mm):
        f = lambda ad: train.row_loss(CONFIG, params, ad, rows, Opts(matmul_dtype=mm), "dots", None)[0]
        return jax.jit(jax.value_and_grad(f))(adapters)

    (l32, g32), (l16, g16) = loss_grad(None), loss_grad(BF16)
    assert abs(float(l16) - float(l32)) < 1e-2 * abs(float(l32)) and float(l16) != float(l32)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * float(jnp.abs(a).max()))
