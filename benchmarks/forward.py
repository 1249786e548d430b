"""Forward throughput of the default model, bdjax (XLA) beside transformers (PyTorch), one JSON line.

    python benchmarks/forward.py [--batch 32] [--seq 128] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import forward_flops, machine, matmul_peak_gflops, time_it  # noqa: E402

import bdjax  # noqa: E402
from bdjax.checkpoints.assets import DEFAULT_MODEL, default_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    args = ap.parse_args()

    model = bdjax.load(DEFAULT_MODEL)
    tokens_np = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq))
    tokens = jnp.asarray(tokens_np, jnp.int32)
    n_tokens = args.batch * args.seq
    bdjax_s = time_it(lambda: model.apply(model.params, tokens).block_until_ready(), warmup=2, reps=args.reps)
    flops = forward_flops(model.config, args.batch, args.seq)
    peak = matmul_peak_gflops()
    result = {
        "benchmark": "forward", "model": DEFAULT_MODEL, "batch": args.batch, "seq": args.seq, "dtype": "float32",
        "bdjax_s": round(bdjax_s, 4), "bdjax_tokens_per_s": round(n_tokens / bdjax_s, 1),
        "bdjax_gflops": round(flops / bdjax_s / 1e9, 1), "matmul_peak_gflops": round(peak, 1),
        "bdjax_fraction_of_peak": round(flops / bdjax_s / 1e9 / peak, 3),
    }
    if not args.skip_hf:
        import torch
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
        t = torch.tensor(tokens_np)

        def run_hf():
            with torch.no_grad():
                hf(t)

        hf_s = time_it(run_hf, warmup=1, reps=args.reps)
        result.update(hf_s=round(hf_s, 4), hf_tokens_per_s=round(n_tokens / hf_s, 1),
                      speedup_vs_hf=round(hf_s / bdjax_s, 2), torch_threads=torch.get_num_threads(),
                      torch_version=torch.__version__, transformers_version=transformers.__version__)
    result.update(jax_version=jax.__version__, **machine())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
