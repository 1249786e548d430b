"""HF safetensors directories: bitwise round trips, shards, transformers compatibility, bad input."""

import errno
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

import bdjax
from bdjax.checkpoints import load_checkpoint, save_hf_dir
from bdjax.checkpoints.tensorfile import TensorFile, write_file
from bdjax.errors import CheckpointError
from conftest import torch_logits


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.ascontiguousarray(x).view(np.uint8),
                                                                            np.ascontiguousarray(y).view(np.uint8))
               for x, y in zip(la, lb))


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama_tied"])
def test_load_save_load_is_bitwise(hf_dirs, tmp_path, family):
    config, params, tok = load_checkpoint(hf_dirs[family][0])
    save_hf_dir(tmp_path / "out", config, params, tok)
    config2, params2, _ = load_checkpoint(tmp_path / "out")
    assert config2 == config
    assert _leaves_equal(params, params2)


def test_bfloat16_round_trip_and_transformers_reads_our_shards(hf_dirs, tmp_path):
    import torch
    import transformers

    config, params, _ = load_checkpoint(hf_dirs["qwen2"][0])
    bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
    out = save_hf_dir(tmp_path / "sharded", config, bf16, max_shard_bytes=20_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    _, again, _ = load_checkpoint(out)
    assert _leaves_equal(bf16, again)
    # transformers loads the sharded bf16 directory and computes what bdjax computes from it.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.arange(12)[None] % 260
    model = bdjax.load(out, param_dtype="float32")
    np.testing.assert_allclose(np.asarray(model.apply(model.params, tokens)), torch_logits(hf, tokens), atol=1e-4)


def test_save_is_atomic_and_replaces(hf_dirs, tmp_path):
    config, params, tok = load_checkpoint(hf_dirs["llama"][0])
    dest = tmp_path / "ckpt"
    save_hf_dir(dest, config, params, tok)
    unsavable = {**params, "final_norm": {"scale": np.array([object()])}}  # fails after writing begins
    with pytest.raises(CheckpointError, match="cannot save tensor 'model.norm.weight'"):
        save_hf_dir(dest, config, unsavable, tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    assert _leaves_equal(load_checkpoint(dest)[1], params)  # the old checkpoint is intact


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused_unopened(hf_dirs, tmp_path, name):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(hf_dirs["llama"][0] / "config.json", d)
    # A pickle whose unpickling would create a file: proof that nothing was unpickled.
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    (d / name).write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="never unpickles.*safetensors"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(d / name)
    assert not (tmp_path / "PWNED").exists()


def _copy_with_config(src, dest, **changes):
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dest


def test_config_that_disagrees_with_tensors(hf_dirs, tmp_path):
    d = _copy_with_config(hf_dirs["llama"][0], tmp_path / "mismatch", intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\) but config.json implies"):
        load_checkpoint(d)


def test_config_with_fewer_layers_than_tensors(hf_dirs, tmp_path):
    d = _copy_with_config(hf_dirs["llama"][0], tmp_path / "layers", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="not part of a llama model"):
        load_checkpoint(d)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(hf_dirs, tmp_path, keep):
    d = tmp_path / "trunc"
    shutil.copytree(hf_dirs["llama"][0], d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(d)


def test_missing_tensor(hf_dirs, tmp_path):
    d = tmp_path / "missing"
    d.mkdir()
    shutil.copy(hf_dirs["llama"][0] / "config.json", d)
    tf = TensorFile(hf_dirs["llama"][0] / "model.safetensors")
    write_file(d / "model.safetensors", [(k, tf.tensor(k)) for k in tf.keys() if "layers.1.mlp.up" not in k])
    with pytest.raises(CheckpointError, match=r"1 tensors are missing \(e.g. \['model.layers.1.mlp.up_proj.weight'\]"):
        load_checkpoint(d)


def test_tensorfile_reads_what_safetensors_writes(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64),
              "c": np.zeros((0, 4), np.float16)}
    save_file(arrays, tmp_path / "x.safetensors")
    tf = TensorFile(tmp_path / "x.safetensors")
    for k, v in arrays.items():
        assert np.array_equal(tf.tensor(k), v) and tf.tensor(k).dtype == v.dtype


@pytest.mark.parametrize("align", [64, 8])
def test_streaming_reads_equal_the_memory_map_for_every_dtype(tmp_path, align):
    import jax
    import ml_dtypes

    from bdjax.checkpoints.tensorfile import TensorFile, write_stream

    arrays = {"f32": np.linspace(-1, 1, 10, dtype=np.float32),  # first: its data starts where the section does
              "bf16": (np.arange(12).reshape(3, 4) / 7).astype(ml_dtypes.bfloat16),
              "i8": np.arange(-4, 4, dtype=np.int8), "empty": np.zeros((0, 3), np.float16)}
    write_stream(tmp_path / "m.safetensors", [(k, a.dtype, a.shape) for k, a in arrays.items()], arrays.values(),
                 align=align)
    f = TensorFile(tmp_path / "m.safetensors")
    assert (f._start % 64 == 0) == (align == 64)
    for name, a in arrays.items():
        got = f.read(name)
        assert got.dtype == a.dtype and np.array_equal(got, a) and np.array_equal(f.tensor(name), a)
        assert got.size == 0 or got.ctypes.data % 64 == 0 or (f._start + f.entries[name][2]) % 64
    # 64-byte-aligned data (what bdjax writes): a read-only view of the file's pages; otherwise an
    # aligned private copy. JAX on CPU uses either in place.
    x = f.read("f32")
    assert x.flags.writeable == (align != 64)
    assert jax.device_put(x).unsafe_buffer_pointer() == x.ctypes.data


@pytest.mark.parametrize("refused", [False, True])
def test_direct_writes_give_the_same_file_as_buffered_ones(tmp_path, monkeypatch, refused):
    """O_DIRECT through the staging buffer (several flushes and a padded, then cut, last block),
    and the ordinary writes it falls back to where the file system refuses O_DIRECT."""
    from bdjax.checkpoints import tensorfile
    from bdjax.checkpoints.tensorfile import write_stream

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n, np.float32) for n in (3, tensorfile._STAGE // 4 + 1001, 5, 2 * tensorfile._STAGE // 4)]
    entries = [(f"t{i}", a.dtype, a.shape) for i, a in enumerate(arrays)]
    write_stream(tmp_path / "plain.safetensors", entries, iter(arrays))
    if refused:  # as on a file system without O_DIRECT: open() says EINVAL
        real_open = os.open

        def no_direct(path, flags, *a):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)
        monkeypatch.setattr(tensorfile.os, "open", no_direct)
    write_stream(tmp_path / "direct.safetensors", entries, iter(arrays), direct=True)
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    assert (tmp_path / "direct.safetensors").stat().st_size % tensorfile._BLOCK  # the padding was cut off
    with pytest.raises(OSError):  # a failing direct write surfaces in the caller too
        write_stream("/dev/full", entries, iter(arrays), direct=True)


def test_streamed_write_reports_a_bad_tensor_and_a_failing_producer(tmp_path):
    from bdjax.checkpoints.tensorfile import TensorFile, write_stream

    entries = [(f"t{i}", np.float32, (256, 64)) for i in range(4)]
    arrays = [np.full((256, 64), i, np.float32) for i in range(4)]
    write_stream(tmp_path / "ok.safetensors", entries, iter(arrays))  # written by the background thread, in order
    f = TensorFile(tmp_path / "ok.safetensors")
    assert all(np.array_equal(f.read(f"t{i}"), arrays[i]) for i in range(4))
    with pytest.raises(CheckpointError, match="t2.*came out as"):
        write_stream(tmp_path / "bad.safetensors", entries, iter(arrays[:2] + [arrays[2][:10]] + arrays[3:]))

    def failing():
        yield arrays[0]
        raise RuntimeError("producer failed")
    with pytest.raises(RuntimeError, match="producer failed"):
        write_stream(tmp_path / "fail.safetensors", entries, failing())
    with pytest.raises(OSError):  # a write that fails on the writer thread surfaces in the caller
        write_stream("/dev/full", entries, iter(arrays))
