import json

import numpy as np
import pytest

from bdjax.errors import ConfigError
from bdjax.models import PRESETS, ModelConfig, preset
from conftest import FAMILIES, hf_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_from_hf_config_round_trips(family):
    hf = hf_model(family).config.to_dict()
    config = ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
    assert config.num_params() == sum(p.numel() for p in hf_model(family).parameters())


def test_llama3_rope_frequencies_match_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**{k: v for k, v in FAMILIES["llama3_scaled_bias"].items() if k != "model_type"})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = ModelConfig.from_hf(hf.to_dict()).inv_freq()
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    unscaled = ModelConfig.from_hf({**hf.to_dict(), "rope_scaling": None, "rope_parameters": None}).inv_freq()
    assert not np.allclose(ours, unscaled)  # the scaling really changes the low frequencies


def test_presets_have_the_published_shapes():
    assert PRESETS["llama3-8b"].num_params() == pytest.approx(8.03e9, rel=0.01)
    assert PRESETS["llama3-70b"].num_params() == pytest.approx(70.6e9, rel=0.01)
    assert PRESETS["smollm2-135m"].num_params() == pytest.approx(134.5e6, rel=0.01)


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_unsupported_configs_raise_config_error(bad, message):
    hf = {**hf_model("llama").config.to_dict(), **bad}
    hf.pop("rope_parameters", None) if "rope_scaling" in bad else None
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="tiny"):
        preset("llama9")


@pytest.mark.parametrize("compute, matmul, expected", [
    ("", "", ("float32", "float32")),
    ("bfloat16", "", ("bfloat16", "bfloat16")),
    ("", "bfloat16", ("float32", "bfloat16")),
])
def test_step_dtypes_fall_back_from_matmul_to_compute_to_model(compute, matmul, expected):
    import jax.numpy as jnp
    import ml_collections

    from bdjax.jobs.training import step_dtypes

    t = ml_collections.ConfigDict({"compute_dtype": compute, "matmul_dtype": matmul})
    assert step_dtypes(t, jnp.float32) == tuple(jnp.dtype(d) for d in expected)
    with pytest.raises(ConfigError, match="not supported"):
        step_dtypes(ml_collections.ConfigDict({"compute_dtype": "float8"}), jnp.float32)
