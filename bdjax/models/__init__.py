"""Llama-family decoder and its configuration."""

from bdjax.models.config import PRESETS, ModelConfig, RopeScaling, preset
from bdjax.models.attention import attention_mask, positions_from_mask
from bdjax.models.llama import Transformer, init_params, logical_axes, param_shapes
from bdjax.models.rows import forward

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "Transformer", "attention_mask", "forward", "init_params",
           "logical_axes", "param_shapes", "positions_from_mask", "preset"]
