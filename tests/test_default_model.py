"""Integration tests on the real embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import bdjax
from bdjax.main import cli
from conftest import repo_root, torch_logits

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "Is the movie review 'a dull, lifeless mess' positive or negative?", "Write one word for happy."]


def test_the_default_answers_paris(default_model):
    (answer,) = bdjax.generate(default_model, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer


def test_logits_match_transformers(default_model, default_hf):
    tok = default_model.tokenizer
    rows = [tok.chat_ids(p) for p in PROMPTS[:2]]
    width = max(map(len, rows))
    tokens = np.array([[tok.pad_id] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    ours = np.asarray(default_model.apply(default_model.params, jnp.asarray(tokens), jnp.asarray(mask)))
    theirs = torch_logits(default_hf, tokens, mask)
    real = mask.astype(bool)
    diff = np.abs(ours - theirs)[real]
    # Logits here reach |70|; float32 summation-order noise alone is ~1e-4 (transformers' own eager and
    # sdpa attention differ by 5.8e-5 on this model). Ours measures 1.2e-4 max, 1.5e-5 mean.
    assert diff.max() <= 2e-4 and diff.mean() <= 3e-5
    assert (ours.argmax(-1) == theirs.argmax(-1))[real].all()


def test_weights_equal_transformers_own_gguf_import(default_model):
    """transformers dequantizes and un-permutes the GGUF itself; our tensors must equal its tensors."""
    import torch
    import transformers

    from bdjax.checkpoints.assets import default_gguf_path
    from bdjax.checkpoints.layout import disassemble

    gguf = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = hf.state_dict()
    params = {k: v for k, v in default_model.params.items()}
    for name, ours in disassemble(default_model.config, params):
        assert np.array_equal(np.asarray(ours), state[name].numpy()), name


def test_greedy_generation_equals_transformers_generate(default_model, default_hf):
    import torch

    tok = default_model.tokenizer
    rows = [tok.chat_ids(p) for p in PROMPTS]
    ours = bdjax.generate_ids(default_model.config, default_model.params, rows, max_new_tokens=24,
                              eos_ids=[tok.eos_id], pad_id=tok.pad_id, batch_size=4)
    for row, got in zip(rows, ours):
        with torch.no_grad():
            out = default_hf.generate(torch.tensor([row]), max_new_tokens=24, do_sample=False,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert got == out[0, len(row):].tolist()


def test_tokenizer_matches_transformers_and_splits_digits(default_model):
    import transformers

    from bdjax.checkpoints.assets import default_gguf_path

    gguf = default_gguf_path()
    theirs = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = default_model.tokenizer
    for text in ["The café's crêpes weren't bad at all!", "  leading spaces\nand\ttabs", "<|im_start|>user\nhi"]:
        assert tok.encode(text) == theirs(text)["input_ids"], text
    # SmolLM2's pre-tokenizer ("smollm") splits numbers into single digits.
    assert [tok.decode([i]) for i in tok.encode("1984")] == ["1", "9", "8", "4"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == theirs.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_generate_recipe_writes_its_answers(tmp_path, capsys):
    recipe = repo_root() / "recipes" / "generate.py"
    assert cli([f"--config={recipe}", f"--config.workdir={tmp_path}", "--config.max_new_tokens=12"]) == 0
    rows = json.loads((tmp_path / "generations.json").read_text())["rows"]
    assert rows[0]["prompt"] == "What is the capital of France?" and "Paris" in rows[0]["completion"]
    assert "Paris" in capsys.readouterr().out
