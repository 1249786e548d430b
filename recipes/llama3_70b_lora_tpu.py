"""Llama-3-70B LoRA fine-tuning on a TPU v5p-128 slice (64 chips, 95 GB HBM each): FSDP over 16
chips × tensor parallelism over 4, bf16.

    bdjax plan --config=recipes/llama3_70b_lora_tpu.py       # compile for 64 simulated devices here
    launch/tpu_pod.sh my-v5p-128 us-east5-a recipes/llama3_70b_lora_tpu.py --config.model=/path/to/Meta-Llama-3-70B-Instruct
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import get_config as quickstart  # noqa: E402


def get_config():
    c = quickstart()
    c.model = "llama3-70b"
    c.workdir = "runs/llama3_70b_lora"
    c.dtype = "bfloat16"
    c.data.n_train = 20000
    c.data.max_text_tokens = 1800
    c.train.batch_size = 64
    c.train.grad_accum = 1
    c.train.lr = 1e-4
    c.train.remat = "full"
    c.train.compute_dtype = "bfloat16"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 4
    c.checkpoint.every = 100
    c.plan = __import__("ml_collections").ConfigDict({"devices": 64, "seq_len": 2048, "answer_tokens": 256})
    c.defense.after_training = False  # defend the exported checkpoint with recipes/defend.py
    return c
