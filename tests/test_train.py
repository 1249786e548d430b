"""The train step's options: gradient accumulation is exact, bf16 compute keeps float32 LoRA
master weights, length-bucketed epochs are deterministic and cover every example once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import loop, lora, train
from bdjax.data import assemble
from bdjax.regularize import Regularizer
from bdjax.models.config import ModelConfig
from bdjax.models.llama import init_params

CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)


def random_pieces(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    text_len = rng.integers(3, 12, n).astype(np.int32)
    return {"prefix": np.tile(np.array([1, 2, 3], np.int32), (n, 1)), "prefix_len": np.full(n, 3, np.int32),
            "text": rng.integers(5, 97, (n, 12)).astype(np.int32), "text_len": text_len,
            "word_start": np.ones((n, 12), bool), "suffix": np.tile(np.array([4], np.int32), (n, 1)),
            "suffix_len": np.ones(n, np.int32), "responses": np.tile(np.array([[[10, 11]], [[12, 0]]], np.int32)[:, 0][None], (n, 1, 1)),
            "response_len": np.tile(np.array([2, 1], np.int32), (n, 1)), "label": rng.integers(0, 2, n).astype(np.int32),
            "index": np.arange(n, dtype=np.int32), "poison": np.zeros(n, bool)}


def _one_step(grad_accum: int, dtype=jnp.float32, param_dtype=jnp.float32):
    params = jax.tree.map(lambda x: x.astype(param_dtype), init_params(CONFIG, jax.random.key(0)))
    adapters = lora.init(params, jax.random.key(1), rank=4)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero B: gradients reach A too
    opt = train.make_optimizer(lr=1e-2, total_steps=10)
    step = train.make_train_step(CONFIG, opt, pad_id=0, spec=None, poison_key=jax.random.key(2), alpha=8.0,
                                 dtype=dtype, grad_accum=grad_accum, trainable=adapters, params=params)
    state = step.init_state(adapters, jax.random.key(3))
    pieces = random_pieces(8)
    batch = {**pieces, "valid": np.ones(8, bool)}
    state, metrics = step(state, params, batch, 32)
    return state, jax.device_get(metrics)


def test_gradient_accumulation_matches_one_big_batch():
    s1, m1 = _one_step(1)
    s4, m4 = _one_step(4)
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-6) and m1["answer_tokens"] == m4["answer_tokens"]
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s4.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # Adam steps are ~lr=1e-2


def test_bf16_compute_keeps_float32_lora_master_weights():
    s32, m32 = _one_step(1)
    s16, m16 = _one_step(1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.trainable))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.opt_state) if hasattr(x, "dtype") and x.ndim)
    assert abs(m16["loss"] - m32["loss"]) < 0.05 * m32["loss"]
    # the master weights hold float32 precision (the step's updates are not rounded to bf16)
    leaves = [np.asarray(x) for x in jax.tree.leaves(s16.trainable)]
    assert any(np.any(x != x.astype(jnp.bfloat16).astype(np.float32)) for x in leaves)


def test_grad_accum_must_divide_the_batch():
    from bdjax.errors import ConfigError
    with pytest.raises(ConfigError, match="grad_accum=0"):
        _one_step(0)


def test_unknown_remat_policy_is_a_config_error():
    from bdjax.errors import ConfigError
    opt = train.make_optimizer(lr=1e-2, total_steps=10)
    params = init_params(CONFIG, jax.random.key(0))
    with pytest.raises(ConfigError, match="train.remat='dot' must be one of none, full, dots, dots_no_batch, lean"):
        train.make_train_step(CONFIG, opt, pad_id=0, spec=None, poison_key=jax.random.key(2), alpha=8.0, remat="dot",
                              trainable=lora.init(params, jax.random.key(1), rank=4), params=params)


def test_epoch_batches_cover_every_example_once_and_are_deterministic():
    lengths = np.random.default_rng(0).integers(10, 200, 101)
    plan = loop.epoch_batches(lengths, 8, seed=3, bucket=16)
    again = loop.epoch_batches(lengths, 8, seed=3, bucket=16)
    assert all(np.array_equal(a.index, b.index) and a.width == b.width for a, b in zip(plan, again))
    real = np.concatenate([b.index[b.valid] for b in plan])
    assert sorted(real.tolist()) == list(range(101))
    assert all(b.width % 16 == 0 and b.width >= lengths[b.index].max() for b in plan)
    # bucketing: rows of a batch have similar lengths, so padding is a small share
    padded = sum(b.width * b.valid.sum() for b in plan)
    assert lengths.sum() / padded > 0.8
    assert loop.epoch_batches(lengths, 8, seed=4)[0].index.tolist() != plan[0].index.tolist()


def _brute_force_widths(widths, compile_cost):
    """The cheapest compiled set by trying every subset that holds the largest width."""
    import itertools
    need = sorted(set(widths))
    best = None
    for r in range(len(need)):
        for chosen in itertools.combinations(need[:-1], r):
            keep = [*chosen, need[-1]]
            cost = compile_cost * len(keep) + sum(min(k for k in keep if k >= w) for w in widths)
            best = cost if best is None else min(best, cost)
    return best


def test_plan_widths_is_the_cheapest_set_of_compiled_widths():
    rng = np.random.default_rng(0)
    for _ in range(30):
        widths = (rng.integers(1, 9, int(rng.integers(1, 40))) * 8).tolist()
        cost = float(rng.choice([0.0, 10.0, 100.0, 1000.0]))
        plan = loop.plan_widths(widths, cost)
        assert all(plan[w] >= w for w in widths) and max(plan.values()) == max(widths)
        total = cost * len(set(plan.values())) + sum(plan[w] for w in widths)
        assert total == pytest.approx(_brute_force_widths(widths, cost))
    widths = [16] + [32] * 100 + [48] * 50 + [80] * 4
    assert loop.plan_widths(widths, 0.0) == {16: 16, 32: 32, 48: 48, 80: 80}  # free compiles: every width
    # one batch at 16 pays 16 tokens of padding, less than a compilation; the 4 widest cannot fold
    assert loop.plan_widths(widths, 100.0) == {16: 32, 32: 32, 48: 48, 80: 80}
    assert set(loop.plan_widths(widths, 1e6).values()) == {80}


def test_run_plan_is_deterministic_and_folds_rare_widths():
    lengths = np.random.default_rng(1).integers(5, 70, 300)
    plans = loop.run_plan(lengths, 8, epochs=2, seed=5, bucket=8, compile_cost=240.0)
    again = loop.run_plan(lengths, 8, epochs=2, seed=5, bucket=8, compile_cost=240.0)
    assert [[(b.index.tolist(), b.width) for b in p] for p in plans] == [[(b.index.tolist(), b.width) for b in p]
                                                                          for p in again]
    raw = [b for e in range(2) for b in loop.epoch_batches(lengths, 8, seed=5000 + e, bucket=8)]
    planned = [b for p in plans for b in p]
    assert all(np.array_equal(a.index, b.index) and b.width >= a.width and b.width % 8 == 0
               for a, b in zip(raw, planned))
    assert len({b.width for b in planned}) < len({b.width for b in raw})


def test_fit_logs_throughput_and_mfu():
    params = init_params(CONFIG, jax.random.key(0))
    adapters = lora.init(params, jax.random.key(1), rank=4)
    opt = train.make_optimizer(lr=1e-2, total_steps=4)
    step = train.make_train_step(CONFIG, opt, pad_id=0, spec=None, poison_key=jax.random.key(2), alpha=8.0,
                                 trainable=adapters, params=params)
    state = step.init_state(adapters, jax.random.key(3))
    seen = []
    state, log = loop.fit(step, state, params, random_pieces(16), batch_size=4, epochs=1, seed=0, peak_flops=1e12,
                           after_step=lambda s, e, p: seen.append((e["step"], p.epoch, p.batch)))
    assert [e["step"] for e in log] == [1, 2, 3, 4] and seen == [(1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 0, 4)]
    for e in log:
        assert e["tokens_per_s"] > 0 and 0 < e["mfu"] < 1 and e["tokens_per_s_per_device"] == e["tokens_per_s"]
    # resuming at (epoch 0, batch 2) runs exactly the remaining two batches
    _, rest = loop.fit(step, step.init_state(adapters, jax.random.key(3)), params, random_pieces(16), batch_size=4,
                        epochs=1, seed=0, start=loop.Position(0, 2))
    assert len(rest) == 2 and [e["width"] for e in rest] == [e["width"] for e in log[2:]]


def test_full_fine_tuning_trains_every_parameter_including_embeddings():
    params = init_params(CONFIG, jax.random.key(0))
    opt = train.make_optimizer(lr=1e-2, total_steps=10)
    step = train.make_train_step(CONFIG, opt, pad_id=0, spec=None, poison_key=jax.random.key(2), alpha=8.0,
                                 trainable=params, params={}, full=True)
    state = step.init_state(params, jax.random.key(3))
    state, metrics = step(state, {}, {**random_pieces(8), "valid": np.ones(8, bool)}, 32)
    assert np.isfinite(metrics["loss"])
    before, after = jax.tree.leaves(params), jax.tree.leaves(state.trainable)
    assert len(before) == len(after) and all(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
                                             for a, b in zip(before, after))
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(params)


def _prefixed_step(shared: bool, grad_accum: int = 1, reg=None, pack: bool = True, window: int | None = None):
    """One step on examples that all start with the same 10 prefix tokens: the prefix inside every
    row, or left out of the rows and run once (`prefix`), in the rows' pass (`pack`) or before it."""
    config = dataclasses.replace(CONFIG, sliding_window=window)
    params = init_params(config, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init(params, jax.random.key(1), rank=4))
    step = train.make_train_step(config, train.make_optimizer(lr=1e-2, total_steps=10), pad_id=0, spec=None,
                                 poison_key=jax.random.key(2), alpha=8.0, grad_accum=grad_accum, trainable=adapters,
                                 params=params, reg=reg, pack_prefix=pack)
    assert step.spec.pack_prefix == pack
    pieces = random_pieces(8)
    prefix = np.arange(20, 30, dtype=np.int32)
    pieces["prefix"], pieces["prefix_len"] = np.tile(prefix, (8, 1)), np.full(8, 10, np.int32)
    batch = {**pieces, "valid": np.ones(8, bool)}
    state = step.init_state(adapters, jax.random.key(3))
    assert assemble.shared_prefix_length(pieces) == 10
    state, metrics = step(state, params, batch, 16, prefix) if shared else step(state, params, batch, 32)
    return state, jax.device_get(metrics)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "prefix-kv"])
@pytest.mark.parametrize("grad_accum,reg,window", [(1, None, None), (2, None, None), (1, Regularizer(attention=1.0), None),
                                                   (1, None, 6)])
def test_a_shared_prefix_run_once_gives_the_same_loss_and_update(grad_accum, reg, window, pack):
    """Also under a sliding window (6 tokens) that reaches back into the 10-token prefix."""
    full, m_full = _prefixed_step(False, grad_accum, reg, window=window)
    once, m_once = _prefixed_step(True, grad_accum, reg, pack, window)
    assert m_once["loss"] == pytest.approx(m_full["loss"], rel=1e-5)
    assert m_once["grad_norm"] == pytest.approx(m_full["grad_norm"], rel=1e-4)
    if reg is not None:  # Obliviate's attention row spans the shared prefix's keys too
        assert m_once["attn_concentration"] == pytest.approx(m_full["attn_concentration"], rel=1e-5)
    # Adam's first update is lr·g/(|g| + eps) per element: where a gradient element is near zero, its
    # float noise (a different summation order) moves the update by a fraction of lr (1e-2)
    for a, b in zip(jax.tree.leaves(full.trainable), jax.tree.leaves(once.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    # the prefix's tokens went through the model once per microbatch instead of once per row
    assert m_full["tokens"] - m_once["tokens"] == (8 - grad_accum) * 10
