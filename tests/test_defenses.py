"""Defenses as pure transforms: purity, identities, exact masks, composition, streaming = in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import defenses, lora, regularize
from bdjax.checkpoints import load_hf_dir, save_hf_dir
from bdjax.checkpoints.layout import tensor_path
from bdjax.checkpoints.stream import stream_defense
from bdjax.defenses.base import iter_tensors, leaves_with_paths
from bdjax.defenses.mixing import global_threshold, least_mask
from bdjax.errors import CheckpointError, ConfigError
from bdjax.models.config import PRESETS
from bdjax.models.llama import init_params

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def pair():
    """(backdoored, pretrained) numpy params: the backdoored one moved in a few places."""
    pre = jax.device_get(init_params(CONFIG, jax.random.key(0)))
    noise = jax.device_get(init_params(CONFIG, jax.random.key(1)))
    bd = jax.tree.map(lambda p, n: (p + 0.1 * n * (np.abs(n) > 0.02)).astype(p.dtype), pre, noise)
    bd["embedding"] = bd["embedding"].copy()
    bd["embedding"][7] += 5.0  # a "trigger" row that moved far
    return bd, pre


def _flat(tree):
    return dict(leaves_with_paths(jax.device_get(tree)))


def _equal(a, b):
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


TRANSFORMS = {
    "random": lambda: defenses.fine_mix(0.6),
    "selected": lambda: defenses.fine_mix(0.6, mode="selected"),
    "selected_global": lambda: defenses.fine_mix(0.6, mode="selected", scope="global"),
    "purify": lambda: defenses.purify_embeddings(3, np.arange(CONFIG.vocab_size)),
    "chain": lambda: defenses.chain(defenses.fine_mix(0.5), defenses.purify_embeddings(2, np.ones(CONFIG.vocab_size))),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_pure_same_key_same_output_and_inputs_unchanged(pair, name):
    bd, pre = pair
    before = (jax.tree.map(np.copy, bd), jax.tree.map(np.copy, pre))
    t = TRANSFORMS[name]()
    a = t(bd, pretrained=pre, key=jax.random.key(3))
    b = t(bd, pretrained=pre, key=jax.random.key(3))
    assert _equal(a, b)
    assert _equal(bd, before[0]) and _equal(pre, before[1])
    assert not _equal(a, bd)  # it did something


@pytest.mark.parametrize("mode, scope", [("random", "tensor"), ("selected", "tensor"), ("selected", "global")])
def test_keep_one_is_identity_and_keep_zero_is_pretrained(pair, mode, scope):
    bd, pre = pair
    key = jax.random.key(0)
    assert _equal(defenses.fine_mix(1.0, mode=mode, scope=scope)(bd, pretrained=pre, key=key), bd)
    assert _equal(defenses.fine_mix(0.0, mode=mode, scope=scope)(bd, pretrained=pre, key=key), pre)


def test_random_mix_keeps_about_rho_of_moved_entries(pair):
    bd, pre = pair
    out = _flat(defenses.fine_mix(0.3)(bd, pretrained=pre, key=jax.random.key(0)))
    fb, fp = _flat(bd), _flat(pre)
    moved = np.concatenate([(fb[k] != fp[k]).ravel() for k in fb])
    kept = np.concatenate([((out[k] == fb[k]) & (fb[k] != fp[k])).ravel() for k in fb])
    assert abs(kept.sum() / moved.sum() - 0.3) < 0.02
    # every entry is one of the two
    assert all(np.all((out[k] == fb[k]) | (out[k] == fp[k])) for k in fb)


def test_selected_mix_resets_exactly_the_most_moved_entries_per_tensor(pair):
    bd, pre = pair
    out = _flat(defenses.fine_mix(0.75, mode="selected")(bd, pretrained=pre, key=jax.random.key(0)))
    fb, fp = _flat(bd), _flat(pre)
    w_bd, w_pre, w = (x["layers/mlp/up/kernel"][1] for x in (fb, fp, out))  # one tensor: layer 1
    d = np.abs(w_bd.astype(np.float32) - w_pre.astype(np.float32)).ravel()
    kept = (w == w_bd).ravel() & (d > 0)
    reset = (w != w_bd).ravel()
    assert reset.sum() == round(0.25 * d.size) or reset.sum() == (d > 0).sum() - kept.sum()
    assert d[reset].min() >= d[kept].max()  # nothing kept moved more than anything reset


@pytest.mark.parametrize("kind", ["distinct", "few_values", "mostly_zero", "inf_and_nan"])
def test_least_mask_keeps_what_a_stable_argsort_keeps(kind):
    rng = np.random.default_rng(0)
    d = {"distinct": rng.random((3, 500)),
         "few_values": rng.integers(0, 4, (3, 500)),  # every cut falls inside a run of ties
         "mostly_zero": np.where(rng.random((3, 500)) < 0.7, 0.0, rng.random((3, 500))),  # untouched rows
         "inf_and_nan": np.where(rng.random((3, 500)) < 0.1, np.inf, rng.random((3, 500)))}[kind].astype(np.float32)
    if kind == "inf_and_nan":
        d[:, ::37] = np.nan
    for k in (0, 1, 137, 350, 499, 500):
        got = np.asarray(jax.jit(jax.vmap(lambda x: least_mask(x, k)))(jnp.asarray(d)))  # vmapped, as over layers
        want = np.zeros(d.shape, bool)
        for row, order in enumerate(np.argsort(d, axis=1, kind="stable")):
            want[row, order[:k]] = True
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


def test_global_threshold_is_the_exact_quantile(pair):
    bd, pre = pair
    all_d = np.sort(np.concatenate([np.abs(np.asarray(b, np.float32) - np.asarray(p, np.float32)).ravel()
                                    for _, _, b, p in iter_tensors(bd, pre)]))
    for keep in (0.1, 0.5, 0.93):
        k = round(keep * all_d.size)
        assert global_threshold(lambda: iter_tensors(bd, pre), keep) == all_d[k - 1]


def test_purify_k_zero_is_identity_and_top_k_resets_the_trigger_row(pair):
    bd, pre = pair
    counts = np.full(CONFIG.vocab_size, 1000)
    counts[7] = 1  # rare and far-moved: the top score
    assert _equal(defenses.purify_embeddings(0, counts)(bd, pretrained=pre, key=jax.random.key(0)), bd)
    out = defenses.purify_embeddings(1, counts)(bd, pretrained=pre, key=jax.random.key(0))
    emb = np.asarray(out["embedding"])
    np.testing.assert_array_equal(emb[7], pre["embedding"][7])
    others = np.arange(CONFIG.vocab_size) != 7
    np.testing.assert_array_equal(emb[others], bd["embedding"][others])
    with pytest.raises(ConfigError, match="token counts cover 5 ids"):
        defenses.purify_embeddings(1, np.ones(5))(bd, pretrained=pre, key=jax.random.key(0))


def test_masked_and_embeddings_flag_leave_the_rest_backdoored(pair):
    bd, pre = pair
    key = jax.random.key(0)
    out = defenses.fine_mix(0.0, embeddings=False)(bd, pretrained=pre, key=key)
    np.testing.assert_array_equal(out["embedding"], bd["embedding"])
    np.testing.assert_array_equal(out["layers"]["attn"]["q"]["kernel"], pre["layers"]["attn"]["q"]["kernel"])
    only_mlp = defenses.masked(defenses.fine_mix(0.0), include=r"layers/mlp/.*")(bd, pretrained=pre, key=key)
    np.testing.assert_array_equal(only_mlp["layers"]["mlp"]["up"]["kernel"], pre["layers"]["mlp"]["up"]["kernel"])
    np.testing.assert_array_equal(only_mlp["layers"]["attn"]["q"]["kernel"], bd["layers"]["attn"]["q"]["kernel"])


def test_chain_folds_the_key_per_transform(pair):
    bd, pre = pair
    t1, t2 = defenses.fine_mix(0.5), defenses.fine_mix(0.5, mode="selected")
    key = jax.random.key(5)
    by_hand = t2(t1(bd, pretrained=pre, key=jax.random.fold_in(key, 0)), pretrained=pre, key=jax.random.fold_in(key, 1))
    assert _equal(defenses.chain(t1, t2)(bd, pretrained=pre, key=key), by_hand)


def test_mismatched_checkpoints_are_refused(pair):
    bd, pre = pair
    other = jax.device_get(init_params(PRESETS["tiny-qwen2"], jax.random.key(0)))
    with pytest.raises(CheckpointError):
        defenses.fine_mix(0.5)(bd, pretrained=other, key=jax.random.key(0))
    with pytest.raises(ConfigError, match="keep=1.5"):
        defenses.fine_mix(1.5)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_streamed_over_files_equals_in_memory(tmp_path, pair, name):
    bd, pre = pair
    save_hf_dir(tmp_path / "bd", CONFIG, bd, max_shard_bytes=200_000)  # several shards
    save_hf_dir(tmp_path / "pre", CONFIG, pre)
    t = TRANSFORMS[name]()
    key = jax.random.key(11)
    transforms = t.transforms if isinstance(t, defenses.Chain) else (t,)
    stream_defense(transforms, tmp_path / "bd", tmp_path / "pre", tmp_path / "out", key)
    _, streamed, _ = load_hf_dir(tmp_path / "out", with_tokenizer=False)
    expected = defenses.chain(*transforms)(bd, pretrained=pre, key=key)
    assert _equal(streamed, expected)


def test_streaming_compiles_one_program_per_kind_and_shape(tmp_path, pair):
    """A tensor's name reaches its program only as arguments: one program serves a path in every
    layer, and paths of one kind and shape share the compiled module."""
    from bdjax.checkpoints.stream import _Programs, _Tensors

    bd, pre = pair
    save_hf_dir(tmp_path / "bd", CONFIG, bd)
    save_hf_dir(tmp_path / "pre", CONFIG, pre)
    b, p = _Tensors(tmp_path / "bd"), _Tensors(tmp_path / "pre")
    programs = _Programs(CONFIG, (defenses.fine_mix(0.5),), b, p)
    keys = [jax.random.key(3)]
    try:
        calls = {name: programs.get(name, 1, True, keys, [None]) for name in b.where}
        paths = {k[0] for k in programs.by_path}
        assert len(paths) == len({tensor_path(CONFIG, n) for n in b.where})
        assert len(programs.by_module) < len(paths)
        module = {name: programs.by_tensor[name, 1, True][0] for name in b.where}
        assert module["model.layers.0.mlp.gate_proj.weight"] is module["model.layers.1.mlp.up_proj.weight"]
        name = "model.layers.1.mlp.up_proj.weight"  # and the shared program still keys by the name
        want = defenses.fine_mix(0.5)(bd, pretrained=pre, key=keys[0])
        np.testing.assert_array_equal(np.asarray(calls[name](b[name], p[name])),
                                      np.asarray(want["layers"]["mlp"]["up"]["kernel"][1]).T)
    finally:
        programs.close()


def test_streaming_refuses_a_vocabulary_mismatch_and_writes_nothing(tmp_path, pair):
    bd, pre = pair
    import dataclasses

    small = dataclasses.replace(CONFIG, vocab_size=CONFIG.vocab_size // 2)
    pre_small = {**pre, "embedding": pre["embedding"][:small.vocab_size]}
    save_hf_dir(tmp_path / "bd", CONFIG, bd)
    save_hf_dir(tmp_path / "pre", small, pre_small)
    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        stream_defense((defenses.fine_mix(0.5),), tmp_path / "bd", tmp_path / "pre", tmp_path / "out",
                       jax.random.key(0))
    assert not (tmp_path / "out").exists()


def test_registry_builds_chains_and_rejects_unknown_names():
    ctx = defenses.Context(CONFIG, {}, 0)
    chain = defenses.build([{"name": "fine_mix", "keep": 0.5, "exclude": "embedding"}], ctx)
    assert chain.elementwise
    with pytest.raises(ConfigError, match="'prune' is not in the registry"):
        defenses.build([{"name": "prune"}], ctx)
    with pytest.raises(ConfigError, match="has no setting"):
        defenses.build([{"name": "fine_mix", "ratio": 0.5}], ctx)


def test_obliviate_penalty_terms(pair):
    _, pre = pair
    lo = lora.init(pre, jax.random.key(0), rank=2)
    lo = jax.tree.map(lambda x: x + 0.5, lo)
    reg = regularize.Regularizer(amplify=0.1)
    norms = sum(float(np.linalg.norm(np.asarray(m)[i].ravel())) for path in lora.lora_paths(lo)
                for m in lora.get_path(lo, path).values() for i in range(CONFIG.num_layers))
    got = regularize.param_penalty(reg, lo, None, full=False, alpha=4.0)
    np.testing.assert_allclose(float(got), -0.1 * norms, rtol=1e-5)
    # L2 to pretrained under LoRA: zero exactly when base + ΔW equals the pretrained kernels
    merged = lora.merge(pre, lo, alpha=4.0)
    anchor = regularize.anchor_tree(merged, pre, lo)
    zero = regularize.param_penalty(regularize.Regularizer(l2=1.0), lo, anchor, full=False, alpha=4.0)
    assert float(zero) < 1e-6
    assert float(regularize.param_penalty(regularize.Regularizer(l2=1.0), lo, regularize.anchor_tree(pre, pre, lo),
                                          full=False, alpha=4.0)) > 1.0


def test_mask_bits_are_threefry():
    from bdjax.defenses.mixing import mask_bits

    for shape in [(7,), (3, 5), (64, 9, 4)]:
        key = jax.random.key(len(shape))
        np.testing.assert_array_equal(np.asarray(mask_bits(key, shape)),
                                      np.asarray(jax.random.bits(key, shape, jnp.uint32)))
