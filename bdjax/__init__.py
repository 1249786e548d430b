"""bdjax: backdoor attacks and defenses for instruction-tuned Llama-family models in JAX/Flax."""

from bdjax import errors
from bdjax.api import Model, load, make_model
from bdjax.decode import generate, generate_ids
from bdjax.errors import BdjaxError
from bdjax.models import ModelConfig
from bdjax.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["BdjaxError", "Model", "ModelConfig", "Tokenizer", "errors", "generate", "generate_ids", "load",
           "make_model"]
