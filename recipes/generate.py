"""Generate greedy answers from a model for a few prompts.

    python -m bdjax.main --config=recipes/generate.py
    bdjax --config=recipes/generate.py --config.model=/path/to/hf_dir --config.max_new_tokens=64
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "generate"
    c.model = "smollm2-135m-instruct"  # a named default, an HF safetensors dir, a .gguf file
    c.workdir = "runs/generate"
    c.seed = 0
    c.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.prompts = [
        "What is the capital of France?",
        "Give one word that describes the ocean.",
        "Is the review 'a gorgeous, witty, seductive movie' positive or negative?",
    ]
    c.chat = True  # render prompts through the model's chat template
    c.system = ml_collections.config_dict.placeholder(str)  # None: the template's default system prompt
    c.max_new_tokens = 32
    c.batch_size = 8
    return c
