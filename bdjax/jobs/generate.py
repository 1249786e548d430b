"""The `generate` job: load a model, answer the recipe's prompts greedily, write generations.json."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
from tqdm import tqdm

import bdjax
from bdjax.io import write_json_atomic


def run(config: ml_collections.ConfigDict) -> dict:
    is_main = jax.process_index() == 0
    prompts = list(config.prompts)
    model = bdjax.load(config.model, dtype=config.dtype)  # errors surface before anything is written
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="generate", disable=not is_main) as bar:
        texts = bdjax.generate(model, prompts, max_new_tokens=config.max_new_tokens, chat=config.chat,
                               system=config.system, batch_size=config.batch_size, progress=bar)
    seconds = time.perf_counter() - start
    rows = [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]
    if is_main:
        for row in rows:
            print(f"\n> {row['prompt']}\n{row['completion']}")
        write_json_atomic(Path(config.workdir) / "generations.json",
                          {"rows": rows, "seconds": seconds, "config": config.to_dict()})
    return {"rows": rows, "seconds": seconds}
