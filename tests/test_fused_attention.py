"""The fused CPU attention kernel (`bdjax/kernels`): output and gradients equal XLA's attention
under every mask shape the model makes, it is chosen only where it applies, a remat policy keeps
its forward from running twice, and a failed build falls back instead of failing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import lora, train
from bdjax.errors import ConfigError
from bdjax.kernels import attention as fused
from bdjax.kernels import build
from bdjax.models import ModelConfig, init_params
from bdjax.models.attention import _attend, attention_mask
from bdjax.models.layers import Opts

pytestmark = pytest.mark.skipif(not fused.available(), reason=f"no C++ toolchain: {build.failure}")


def _operands(b, s, t, k, g, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, s, k, g, d))
    keys, values = jax.random.normal(ks[1], (b, t, k, d)), jax.random.normal(ks[2], (b, t, k, d))
    return q, keys, values, jax.random.normal(ks[3], (b, s, k, g, d))


def _masks(b, s, t, window=None):
    """Causal masks over rows whose last tokens are padding (padded query rows see no key at all)."""
    valid = np.ones((b, t), bool)
    if b > 1:
        valid[1, t // 2:] = False
    if b > 2:
        valid[2, t - 3:] = False
    slots = jnp.broadcast_to(jnp.arange(t - s, t)[None], (b, s))
    mask = attention_mask(slots, jnp.asarray(valid), window)
    return mask & jnp.asarray(valid)[:, t - s:, None]


@pytest.mark.parametrize("b, s, t, k, g, d, window", [
    (3, 37, 37, 2, 3, 32, None),  # ragged lengths: no multiple of the kernel's tiles
    (2, 128, 128, 3, 3, 64, None),  # the default model's heads
    (3, 20, 20, 1, 4, 16, 6),  # sliding window (Mistral-style)
    (2, 8, 40, 2, 1, 16, None),  # fewer queries than keys (the last 8 of 40 slots)
])
def test_output_and_gradients_match_xla(b, s, t, k, g, d, window):
    q, keys, values, dout = _operands(b, s, t, k, g, d)
    mask = _masks(b, s, t, window)
    assert not bool(mask.any(-1).all())  # some rows attend to nothing: the uniform-softmax case
    _assert_matches_xla(q, keys, values, dout, mask)


def test_masks_with_holes_match_xla():
    """Keys masked out inside a row's valid range (the kernel masks 16 keys at a time there, one
    by one at the range's ends), runs of masked keys longer than 8 at either end, and rows
    that see nothing."""
    b, s, t, k, g, d = 2, 24, 70, 2, 2, 32
    q, keys, values, dout = _operands(b, s, t, k, g, d, seed=2)
    rng = np.random.default_rng(0)
    mask = rng.random((b, s, t)) < 0.7
    mask[0, :, :19] = False  # 19 masked keys before the range
    mask[1, :, 45:] = False  # 25 masked keys after it
    mask[:, 3] = False  # a row with no key
    _assert_matches_xla(q, keys, values, dout, jnp.asarray(mask))


def _assert_matches_xla(q, keys, values, dout, mask):
    ours = jax.jit(lambda *a: jax.vjp(lambda *x: fused.attention(*x, mask), *a)[1](dout) +
                   (fused.attention(*a, mask),))(q, keys, values)
    ref = jax.jit(lambda *a: jax.vjp(lambda *x: _attend(x[0], [(x[1], x[2], "btkd", mask)], jnp.float32)[0], *a)[1](
        dout) + (_attend(a[0], [(a[1], a[2], "btkd", mask)], jnp.float32)[0],))(q, keys, values)
    for name, x, y in zip(("dq", "dk", "dv", "out"), ours, ref):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-5, err_msg=name)


def test_results_do_not_depend_on_the_thread_schedule():
    q, keys, values, _ = _operands(4, 64, 64, 2, 2, 32, seed=1)
    mask = _masks(4, 64, 64)
    f = jax.jit(lambda *a: fused.attention(*a, mask))
    first = np.asarray(f(q, keys, values))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(q, keys, values)), first)


def test_usable_only_where_it_applies():
    q, keys, values, _ = _operands(1, 4, 4, 1, 2, 16)
    mask = _masks(1, 4, 4)
    assert fused.usable("auto", q, keys, values, mask)
    assert not fused.usable("xla", q, keys, values, mask)
    assert not fused.usable("auto", q, keys, values, mask, devices=8)  # a sharded call keeps XLA's ops
    half = [x.astype(jnp.bfloat16) for x in (q, keys, values)]
    assert not fused.usable("auto", *half, mask)
    with pytest.raises(ConfigError, match="float32 only"):
        fused.usable("fused", *half, mask)
    odd_q, odd_k, odd_v, _ = _operands(1, 4, 4, 1, 2, 12)
    with pytest.raises(ConfigError, match="multiple of 16"):
        fused.usable("fused", odd_q, odd_k, odd_v, mask)
    with pytest.raises(ConfigError, match="must be one of"):
        fused.usable("flash", q, keys, values, mask)


CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=80, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)


def _loss_and_grads(attention, remat, prefix: int = 0):
    """The LoRA loss and its gradient on three ragged rows; with `prefix`, the rows continue that
    many shared tokens, run once in the rows' pass (`row_nll(pack_prefix=True)`)."""
    params = init_params(CONFIG, jax.random.key(0))
    adapters = lora.init(params, jax.random.key(1), rank=4)
    tokens = jax.random.randint(jax.random.key(2), (3, 24), 0, CONFIG.vocab_size)
    valid = jnp.arange(24)[None] < jnp.array([[24], [17], [9]])
    rows = {"tokens": tokens, "valid": valid, "logits_at": jnp.tile(jnp.arange(23)[None], (3, 1)),
            "targets": tokens[:, 1:], "weights": valid[:, 1:].astype(jnp.float32)}
    opts = Opts(lora_alpha=8.0, attention=attention)
    shared = jnp.arange(5, 5 + prefix, dtype=jnp.int32) if prefix else None

    def loss(ad):
        total, count, _ = train.row_nll(CONFIG, params, ad, rows, opts, remat, None, prefix=shared,
                                        pack_prefix=prefix > 0)
        return total / count
    return jax.jit(jax.value_and_grad(loss)), adapters


@pytest.mark.parametrize("prefix", [0, 7], ids=["rows", "packed-prefix"])
@pytest.mark.parametrize("remat", ["none", "dots", "lean"])
def test_model_loss_and_lora_gradients_match_xla(remat, prefix):
    f_ours, adapters = _loss_and_grads("fused", remat, prefix)
    f_xla, _ = _loss_and_grads("xla", remat, prefix)
    if prefix:  # both the prefix's own attention and the rows' (over the prefix and themselves)
        assert _calls(f_ours.lower(adapters).compile().as_text(), "bdjax_attention_forward") == 2
    (l1, g1), (l2, g2) = f_ours(adapters), f_xla(adapters)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), g1, g2)


def _calls(text, name):
    return text.count(f'custom_call_target="{name}"')


@pytest.mark.parametrize("remat, forwards", [("dots", 1), ("lean", 1), ("full", 2)])
def test_remat_policy_keeps_the_forward_kernel_from_running_twice(remat, forwards):
    f, adapters = _loss_and_grads("fused", remat)
    text = f.lower(adapters).compile().as_text()
    # one call site per pass inside the layer scan: the forward's, and with "full" remat its rerun
    assert _calls(text, "bdjax_attention_forward") == forwards
    assert _calls(text, "bdjax_attention_backward") == 1
    f_xla, _ = _loss_and_grads("xla", remat)
    assert _calls(f_xla.lower(adapters).compile().as_text(), "bdjax_attention_forward") == 0


def test_a_failed_build_falls_back_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "failure", {})
    monkeypatch.setenv("CXX", "no-such-compiler-bdjax")
    assert build.load("attention_cpu") is None
    assert "no C++ compiler" in build.failure["attention_cpu"]
    # a compiler that runs but fails: the error says so, and no partial library is left in the cache
    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && echo broken 1.0 && exit 0\necho "no luck" >&2\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setenv("CXX", str(broken))
    assert build.load("attention_cpu") is None
    assert "failed: no luck" in build.failure["attention_cpu"]
    assert not list((tmp_path / "kernels").glob("*"))
    q, keys, values, _ = _operands(1, 4, 4, 1, 2, 16)
    monkeypatch.setattr(fused, "_registered", False)
    monkeypatch.setattr(fused, "_warned", False)
    with pytest.warns(RuntimeWarning, match="not available.*no luck"):  # said once...
        assert not fused.usable("auto", q, keys, values, _masks(1, 4, 4))  # ...and auto falls back to XLA's ops
    with pytest.raises(ConfigError, match="not available: .*no luck"):
        fused.usable("fused", q, keys, values, _masks(1, 4, 4))


def test_a_build_lands_in_the_cache_under_a_content_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.delenv("CXX", raising=False)
    lib = build.load("attention_cpu")
    assert lib is not None and hasattr(lib, "BdjaxAttentionForward")
    built = list((tmp_path / "kernels").glob("attention_cpu-*.so"))
    assert [p.name for p in built] == [build.library_path("attention_cpu", "c++").name]


def test_a_kernels_directory_others_can_write_is_not_loaded_from(tmp_path, monkeypatch):
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "failure", {})
    monkeypatch.delenv("CXX", raising=False)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels").chmod(0o777)
    assert build.load("attention_cpu") is None  # whoever can write there could plant a library
    assert "kernels is writable by other users" in build.failure["attention_cpu"]
    assert not list((tmp_path / "kernels").glob("*"))
    # a private directory, but a library in it that others could overwrite: not loaded either
    (tmp_path / "kernels").chmod(0o700)
    monkeypatch.setattr(build, "_LOADED", {})
    assert build.load("attention_cpu") is not None
    (lib,) = (tmp_path / "kernels").glob("attention_cpu-*.so")
    lib.chmod(0o666)
    monkeypatch.setattr(build, "_LOADED", {})
    assert build.load("attention_cpu") is None
    assert "writable by other users" in build.failure["attention_cpu"]
