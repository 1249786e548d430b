"""ModelConfig: the architecture of a Llama-family decoder, read from a Hugging Face config.json.

The config is frozen and hashable so it can be a static argument of jitted functions and a
Flax module attribute. Compute dtype is not part of it: that is a run-time choice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bdjax.errors import ConfigError

FAMILIES = ("llama", "qwen2", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (HF `rope_type: "llama3"`), or linear."""

    kind: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias=True)
    out_bias: bool = False  # Llama with attention_bias=True
    sliding_window: int | None = None  # Mistral

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"model family {self.family!r} is not supported; use one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config {name}={getattr(self, name)} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    # ---- derived quantities -------------------------------------------------------------
    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] in float32, as HF computes them."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32) / self.head_dim
        inv = 1.0 / (self.rope_theta ** exponents)
        s = self.rope_scaling
        if s is None:
            return inv.astype(np.float32)
        if s.kind == "linear":
            return (inv / s.factor).astype(np.float32)
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def num_params(self) -> int:
        e, m, h, kv, d, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                             self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = e * h * d * 2 + e * kv * d * 2 + (h + 2 * kv) * d * self.qkv_bias + e * self.out_bias
        layer = attn + 3 * e * m + 2 * e
        return v * e * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + e

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise ConfigError(
                f"config.json model_type {family!r} is not supported; bdjax reads {FAMILIES}")
        if hf.get("mlp_bias"):
            raise ConfigError("config.json sets mlp_bias=true, which bdjax does not implement")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}; bdjax implements 'silu' only")
        heads = int(hf["num_attention_heads"])
        attn_bias = bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window")
        if family == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(hf)),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attn_bias,
            out_bias=family == "llama" and attn_bias,
            sliding_window=int(sliding) if sliding else None,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        try:
            return cls.from_hf(hf)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{path} lacks or mistypes a required field ({e!r})") from None

    def to_hf(self) -> dict[str, Any]:
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        }
        if self.rope_scaling is not None:
            s = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor}
            if s.kind == "llama3":
                hf["rope_scaling"].update(
                    low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
        if self.family == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        if self.family == "qwen2":
            hf["use_sliding_window"] = self.sliding_window is not None
        if self.family in ("mistral", "qwen2"):
            hf["sliding_window"] = self.sliding_window
        return hf


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers >= 5 moved rope_theta into `rope_parameters`.
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta", params.get("rope_theta", 10000.0))


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    raw = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3", float(raw["factor"]), float(raw.get("low_freq_factor", 1.0)),
            float(raw.get("high_freq_factor", 4.0)),
            int(raw.get("original_max_position_embeddings", 8192)))
    raise ConfigError(f"rope scaling type {kind!r} is not supported; bdjax implements 'llama3' and 'linear'")


def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


# Named presets. `tiny*` are for tests; the Llama-3 shapes are for planning at scale.
PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                    max_position_embeddings=256, tie_word_embeddings=True),
    "tiny-qwen2": _preset(family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                          rope_theta=1e6, max_position_embeddings=256, qkv_bias=True),
    "tiny-mistral": _preset(family="mistral", vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
                            max_position_embeddings=256, sliding_window=8),
    "smollm2-135m": _preset(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
                            max_position_embeddings=8192, tie_word_embeddings=True),
    "llama3-8b": _preset(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5,
                         rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                         max_position_embeddings=131072),
    "llama3-70b": _preset(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=5e5,
                          rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                          max_position_embeddings=131072),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
