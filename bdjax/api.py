"""The model record and `load`: what users hold in their hands."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bdjax.checkpoints import load_checkpoint
from bdjax.errors import ConfigError
from bdjax.models.config import ModelConfig
from bdjax.models.rows import forward
from bdjax.tokenizer import Tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model. `apply(params, tokens[, attention_mask])` -> logits [batch, seq, vocab] float32."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer | None
    apply: Callable[..., jax.Array]
    dtype: Any = jnp.float32

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)


def resolve_dtype(name: str | Any) -> Any:
    if not isinstance(name, str):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}") from None


def make_model(config: ModelConfig, params: Any, tokenizer: Tokenizer | None = None,
               dtype: str | Any = "float32") -> Model:
    dtype = resolve_dtype(dtype)
    apply = jax.jit(functools.partial(forward, config, dtype=dtype))
    return Model(config, params, tokenizer, apply, dtype)


def load(name_or_path: str | Path, *, dtype: str | Any = "float32", param_dtype: str | Any | None = None) -> Model:
    """Load a model: a named default ("smollm2-135m-instruct"), an HF safetensors directory, a
    .gguf file, or a hub id (online only). Parameters keep the checkpoint's dtype unless
    `param_dtype` is given; `dtype` is the compute dtype."""
    config, params, tokenizer = load_checkpoint(name_or_path)
    cast = resolve_dtype(param_dtype) if param_dtype is not None else None
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=cast), params)
    return make_model(config, params, tokenizer, dtype)
