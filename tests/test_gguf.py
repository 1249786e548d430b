"""GGUF import: dequantization, llama.cpp's q/k permutation, tokenizer and chat template, bad files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bdjax
import gguf_files
from bdjax.checkpoints import load_checkpoint
from bdjax.errors import CheckpointError
from conftest import torch_logits

# Worst-case relative reconstruction error of each format on N(0, 0.1) weights.
QTYPES = {"F32": 0.0, "F16": 1e-3, "Q8_0": 0.01, "Q4_0": 0.2, "Q4_1": 0.15}


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_import_recovers_the_weights(hf_dirs, tmp_path, family, qtype):
    _, torch_model = hf_dirs[family]
    hf_state = _state(torch_model)
    path = gguf_files.write(tmp_path / f"m-{qtype}.gguf", torch_model.config.to_dict(), hf_state, qtype)
    config, params, _ = load_checkpoint(path)
    _, reference, _ = load_checkpoint(hf_dirs[family][0])
    assert config.family == family and config.num_kv_heads == torch_model.config.num_key_value_heads
    for name in ("q", "k", "v", "o"):
        ours = params["layers"]["attn"][name]["kernel"]
        ref = reference["layers"]["attn"][name]["kernel"]
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err <= QTYPES[qtype] + 1e-7, (name, err)
    if qtype == "F32":  # lossless: bitwise, which proves the un-permutation is exact
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_quantized_import_matches_transformers_gguf_loader(hf_dirs, tmp_path, qtype):
    """transformers dequantizes and un-permutes GGUF files itself: an independent oracle."""
    import torch
    import transformers

    _, torch_model = hf_dirs["llama"]
    path = gguf_files.write(tmp_path / "m.gguf", torch_model.config.to_dict(), _state(torch_model), qtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    model = bdjax.load(path)
    tokens = np.random.default_rng(0).integers(0, 260, (2, 16))
    np.testing.assert_allclose(np.asarray(model.apply(model.params, jnp.asarray(tokens))),
                               torch_logits(theirs, tokens), atol=1e-4)


def test_tokenizer_and_chat_template_come_from_metadata(hf_dirs, tmp_path):
    _, torch_model = hf_dirs["llama_tied"]
    path = gguf_files.write(tmp_path / "m.gguf", torch_model.config.to_dict(), _state(torch_model))
    model = bdjax.load(path)
    tok = model.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>" and tok.pad_token == "<pad>"
    text = "Héllo, wörld! 123"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # byte-level with no merges: one token per byte
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_ids("hi")[0] == gguf_files.VOCAB.index("<|im_start|>")  # an atomic special token


def test_unsupported_architecture(hf_dirs, tmp_path):
    _, torch_model = hf_dirs["llama"]
    path = gguf_files.write(tmp_path / "m.gguf", torch_model.config.to_dict(), _state(torch_model), arch="falcon")
    with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported"):
        load_checkpoint(path)


def test_unsupported_quantization_type(hf_dirs, tmp_path):
    _, torch_model = hf_dirs["llama"]
    path = gguf_files.write(tmp_path / "m.gguf", torch_model.config.to_dict(), _state(torch_model),
                            raw_type="IQ4_NL")
    with pytest.raises(CheckpointError, match="quantization type IQ4_NL, which bdjax does not import"):
        load_checkpoint(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_checkpoint(path)
