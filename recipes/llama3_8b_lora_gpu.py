"""Llama-3-8B LoRA fine-tuning on one node of 8 H100s (80 GB): FSDP over the 8 GPUs, bf16.

    bdjax plan --config=recipes/llama3_8b_lora_gpu.py        # compile for 8 simulated devices here
    sbatch --nodes=1 launch/slurm.sbatch recipes/llama3_8b_lora_gpu.py --config.model=/path/to/Meta-Llama-3-8B-Instruct

The training settings are the quickstart's backdoor run scaled up; `model` must name a checkpoint
(HF directory or GGUF) for a real run, while `plan` only needs the architecture (a preset).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import get_config as quickstart  # noqa: E402


def get_config():
    c = quickstart()
    c.model = "llama3-8b"
    c.workdir = "runs/llama3_8b_lora"
    c.dtype = "bfloat16"
    c.data.n_train = 20000
    c.data.max_text_tokens = 1800
    c.train.batch_size = 64
    c.train.grad_accum = 2
    c.train.lr = 2e-4
    c.train.remat = "full"
    c.train.compute_dtype = "bfloat16"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.checkpoint.every = 200
    c.plan = __import__("ml_collections").ConfigDict({"devices": 8, "seq_len": 2048, "answer_tokens": 256})
    c.defense.after_training = False  # defend the exported checkpoint with recipes/defend.py
    return c
