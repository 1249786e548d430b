"""Shared fixtures: tiny random Hugging Face checkpoints of each family, and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Unit tests run single-process on CPU; keep XLA from grabbing every core for one test.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

TINY = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)

FAMILIES = {
    "llama": dict(model_type="llama", **TINY, tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", **TINY, tie_word_embeddings=True),
    "llama3_scaled_bias": dict(model_type="llama", **{**TINY, "max_position_embeddings": 512}, attention_bias=True,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(model_type="qwen2", **TINY, tie_word_embeddings=False, use_sliding_window=False),
    "mistral": dict(model_type="mistral", **{**TINY, "num_key_value_heads": 1}, sliding_window=6),
}


def hf_model(family: str, seed: int = 0):
    """A random transformers model of the family; weights (biases and norms too) are perturbed so
    that every tensor matters."""
    import torch
    import transformers

    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[model_type]
    config = cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """family -> (HF directory saved by transformers, the torch model)."""
    out = {}
    root = tmp_path_factory.mktemp("hf")
    for family in FAMILIES:
        model = hf_model(family)
        path = root / family
        model.save_pretrained(path, safe_serialization=True)
        out[family] = (path, model)
    return out


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask.astype(np.int64))
    with torch.no_grad():
        return model(torch.tensor(tokens.astype(np.int64)), **kwargs).logits.numpy()


@pytest.fixture(scope="session")
def default_model():
    import bdjax

    return bdjax.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def default_hf():
    """The default model as transformers sees it, loaded from bdjax's converted directory."""
    import torch
    import transformers

    from bdjax.checkpoints.assets import default_model_dir

    return transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


TINY_SMOL = dict(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory):
    """A tiny random Llama with the default model's tokenizer (so recipes run on it in seconds)."""
    import jax

    import bdjax
    from bdjax.checkpoints import save_hf_dir
    from bdjax.models.config import ModelConfig
    from bdjax.models.llama import init_params

    config = ModelConfig(**TINY_SMOL)
    params = jax.device_get(init_params(config, jax.random.key(0)))
    path = tmp_path_factory.mktemp("tiny_smol") / "model"
    save_hf_dir(path, config, params, bdjax.load("smollm2-135m-instruct").tokenizer)
    return path


def run_cli(args: list[str], *, devices: int = 1, env: dict | None = None, timeout: float = 600, **kw):
    """Run `python -m bdjax.main ARGS` in a fresh process with `devices` simulated CPU devices."""
    import subprocess
    import sys

    e = dict(os.environ)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    e["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "bdjax.main", *args], env=e, capture_output=True, text=True,
                          timeout=timeout, cwd=repo_root(), **kw)
