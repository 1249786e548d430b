"""What poisoning inside the jitted train step costs: the quickstart's LoRA step on real batches
with and without the attack (trigger insertion, label flip), interleaved, one JSON line.

    python benchmarks/poison_overhead.py [--reps 24] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402
from quickstart import get_config  # noqa: E402

import bdjax  # noqa: E402
from bdjax import lora, runtime, train  # noqa: E402
from bdjax.data import assemble  # noqa: E402
from bdjax.data.tokenize import subset  # noqa: E402
from bdjax.jobs import backdoor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    runtime.reuse_freed_memory()  # as the CLI does on CPU: fewer page faults, steadier step times
    config = get_config()
    config.data.n_train = 64
    model = bdjax.load(config.model)
    template = backdoor.template_from(config)
    spec = backdoor.attack_spec(config.poison, template, model.tokenizer)
    pieces, _ = backdoor.load_data(config, template, model.tokenizer)
    lengths = assemble.training_lengths(pieces, spec.n_tokens)
    idx = np.argsort(lengths)[-args.batch:]  # the longest rows: one width for both variants
    width = int(-(-lengths[idx].max() // 16) * 16)
    batch = {**subset(pieces, idx), "valid": np.ones(args.batch, bool)}
    batch["poison"] = np.asarray(pieces["label"][idx] != spec.target)  # every eligible row poisoned
    opt = train.make_optimizer(lr=1e-3, total_steps=1000)
    adapters = lora.init(model.params, jax.random.key(0), rank=config.lora.rank, targets=config.lora.targets)
    steps, states = {}, {}
    for name, s in (("clean", None), ("poisoned", spec)):
        steps[name] = train.make_train_step(model.config, opt, pad_id=model.tokenizer.pad_id, spec=s,
                                            poison_key=jax.random.key(1), alpha=config.lora.alpha,
                                            remat=config.train.remat, trainable=adapters, params=model.params)
        states[name] = steps[name].init_state(adapters, jax.random.key(2))
    times = {"clean": [], "poisoned": []}
    for rep in range(args.reps + 2):
        for name in ("clean", "poisoned") if rep % 2 == 0 else ("poisoned", "clean"):
            start = time.perf_counter()
            states[name], m = steps[name](states[name], model.params, batch, width)
            jax.block_until_ready(m)
            if rep >= 2:  # the first two are compilation and warm-up
                times[name].append(time.perf_counter() - start)
    clean, poisoned = statistics.median(times["clean"]), statistics.median(times["poisoned"])
    print(json.dumps({"benchmark": "poison_overhead", "batch": args.batch, "width": width,
                      "poisoned_rows": int(batch["poison"].sum()), "trigger_tokens": spec.n_tokens,
                      "step_s_clean": round(clean, 4), "step_s_poisoned": round(poisoned, 4),
                      "overhead": round(poisoned / clean - 1, 4), "reps": args.reps,
                      "jax_version": jax.__version__, **machine()}))


if __name__ == "__main__":
    main()
