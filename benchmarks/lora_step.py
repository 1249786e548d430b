"""One LoRA training step of the default model, bdjax beside Hugging Face PEFT, one JSON line.

Setting (issue #3): SmolLM2-135M-Instruct, LoRA r=8 (alpha 16) on q,k,v,o,gate,up,down, batch
8 x 128, next-token loss on every token, float32, AdamW; same machine, same run.

    python benchmarks/lora_step.py [--reps 5] [--remat lean] [--attention auto|xla] [--compare-attention]
                                   [--compare-side-by-side]
                                   [--skip-peft] [--peft-compile] [--peft-same-malloc] [--default-malloc]

bdjax's attention runs in its fused CPU kernel (bdjax/kernels) unless `--attention xla`. PEFT runs
in spawned worker processes, one step per request, and every variant's steps are taken in turn
(bdjax, PEFT eager, PEFT compiled, a matmul-peak sample, then again), so that the machine's speed,
which drifts here by more than the gaps measured, reaches all of them alike. Each figure is the
median over `--reps` rounds; MFU divides by the best peak sample of the run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import lora_step_flops, machine, matmul_peak_gflops  # noqa: E402

import bdjax  # noqa: E402
from bdjax import lora, runtime, train  # noqa: E402
from bdjax.checkpoints.assets import DEFAULT_MODEL, default_model_dir  # noqa: E402
from bdjax.kernels import attention as fused_attention  # noqa: E402
from bdjax.models.llama import Opts  # noqa: E402

RANK, ALPHA, LR = 8, 16.0, 1e-3


def bdjax_step(model, tokens: np.ndarray, remat: str, attention: str = "auto", side_by_side: bool = False):
    b, s = tokens.shape
    rows = {"tokens": jnp.asarray(tokens), "valid": jnp.ones((b, s), bool),
            "logits_at": jnp.tile(jnp.arange(s - 1)[None], (b, 1)), "targets": jnp.asarray(tokens[:, 1:]),
            "weights": jnp.ones((b, s - 1))}
    optimizer = train.make_optimizer(lr=LR, total_steps=1000, max_grad_norm=None, schedule="constant")
    state = train.init_state(lora.init(model.params, jax.random.key(0), rank=RANK), optimizer, jax.random.key(1))
    opts = Opts(lora_alpha=ALPHA, attention=attention, lora_side_by_side=side_by_side)

    @jax.jit
    def step(state, params, rows):
        loss, grads = jax.value_and_grad(
            lambda ad: train.row_loss(model.config, params, ad, rows, opts, remat, None)[0])(state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        return state.replace(trainable=jax.tree.map(jnp.add, state.trainable, updates), opt_state=opt_state), loss

    box = [state]

    def run():
        box[0], loss = step(box[0], model.params, rows)
        loss.block_until_ready()

    return run


def interleaved(runs, *, warmup: int, reps: int) -> list[float]:
    """Median seconds of each run, their steps taken in turn (so that drift in the machine's speed
    reaches every variant alike). A run either returns its own step time (a worker process's) or
    None, and is then timed here."""
    for _ in range(warmup):
        for run in runs:
            run()
    times = [[] for _ in runs]
    for _ in range(reps):
        for run, t in zip(runs, times):
            start = time.perf_counter()
            took = run()
            t.append(time.perf_counter() - start if took is None else took)
    return [float(np.median(t)) for t in times]


def peft_step(tokens: np.ndarray, compiled: bool):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    forward = torch.compile(model) if compiled else model
    ids = torch.tensor(tokens)

    def run():
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run, torch


def _peft_worker(conn, tokens: np.ndarray, compiled: bool, reuse: bool) -> None:
    """A spawned interpreter that runs one PEFT step per request and answers its time: with glibc's
    default malloc (as PEFT runs out of the box), or with `reuse` under the same malloc settings as
    bdjax's process (runtime.reuse_freed_memory, applied before torch is imported)."""
    if reuse:
        runtime.reuse_freed_memory()
    run, torch = peft_step(tokens.astype(np.int64), compiled=compiled)
    conn.send((torch.get_num_threads(), torch.__version__))
    while conn.recv():
        start = time.perf_counter()
        run()
        conn.send(time.perf_counter() - start)


class PeftWorker:
    """PEFT's step in its own process, driven step by step, so that its steps interleave with
    bdjax's (the machine's speed drifts by more than the gap being measured)."""

    def __init__(self, tokens: np.ndarray, compiled: bool, reuse: bool = False):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_peft_worker, args=(child, tokens, compiled, reuse), daemon=True)
        self.process.start()
        self.threads, self.version = self.conn.recv()

    def __call__(self) -> float:
        self.conn.send(True)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(False)
        self.process.join()


class PeakProbe:
    """The float32 matmul peak sampled once per round (square products through XLA); the best
    sample over the run is MFU's denominator, so a slow moment never inflates MFU."""

    def __init__(self, n: int = 2048):
        self.a, self.b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in (0, 1))
        self.f = jax.jit(jnp.dot)
        self.n, self.best = n, 0.0

    def __call__(self) -> float:
        start = time.perf_counter()
        self.f(self.a, self.b).block_until_ready()
        took = time.perf_counter() - start
        self.best = max(self.best, 2 * self.n**3 / took / 1e9)
        return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--remat", default="lean", help="bdjax remat policy: none | lean | dots | dots_no_batch | full")
    ap.add_argument("--attention", default="auto", choices=("auto", "fused", "xla"),
                    help="bdjax attention: its fused CPU kernel where it applies (auto), or XLA's ops")
    ap.add_argument("--compare-attention", action="store_true",
                    help="also time bdjax with XLA's attention, steps interleaved with the fused one's")
    ap.add_argument("--compare-side-by-side", action="store_true",
                    help="also time bdjax with LoRA's rank-r products in the merged GEMMs' extra columns "
                         "(Opts.lora_side_by_side), steps interleaved")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--peft-compile", action="store_true", help="also time PEFT under torch.compile")
    ap.add_argument("--peft-same-malloc", action="store_true",
                    help="also time PEFT under bdjax's malloc settings (runtime.reuse_freed_memory): on a VM "
                         "where page faults are dear, PEFT's default-malloc step is mostly re-faulting freed memory")
    ap.add_argument("--default-malloc", action="store_true",
                    help="skip bdjax.runtime.reuse_freed_memory() (applies to the whole process, PEFT included)")
    args = ap.parse_args()
    reused = False if args.default_malloc else runtime.reuse_freed_memory()  # before the first JAX call

    model = bdjax.load(DEFAULT_MODEL)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tokens = args.batch * args.seq
    fused = args.attention != "xla" and fused_attention.available()
    variants = {"bdjax": bdjax_step(model, tokens, args.remat, args.attention)}
    if args.compare_attention:
        variants["bdjax_xla"] = bdjax_step(model, tokens, args.remat, "xla")
    if args.compare_side_by_side:
        variants["bdjax_side_by_side"] = bdjax_step(model, tokens, args.remat, args.attention, side_by_side=True)
    workers = []
    if not args.skip_peft:
        for compiled in (False, True) if args.peft_compile else (False,):
            for reuse in (False, True) if args.peft_same_malloc else (False,):
                name = ("peft_compile" if compiled else "peft_eager") + ("_same_malloc" if reuse else "")
                variants[name] = PeftWorker(tokens, compiled, reuse)
                workers.append(variants[name])
    probe = PeakProbe()
    try:
        times = dict(zip(variants, interleaved([*variants.values(), probe], warmup=2, reps=args.reps)))
    finally:
        for w in workers:
            w.close()
    bdjax_s = times["bdjax"]
    peak = max(probe.best, matmul_peak_gflops())
    flops = lora_step_flops(model.config, args.batch, args.seq, logits_tokens=args.batch * (args.seq - 1))
    result = {"benchmark": "lora_step", "model": DEFAULT_MODEL, "batch": args.batch, "seq": args.seq,
              "rank": RANK, "dtype": "float32", "remat": args.remat,
              "attention": "fused" if fused else "xla", "reuse_freed_memory": reused, "interleaved": True,
              "reps": args.reps, "bdjax_step_s": round(bdjax_s, 4),
              "tokens_per_s": round(n_tokens / bdjax_s, 1), "step_gflop": round(flops / 1e9, 1),
              "matmul_peak_gflops": round(peak, 1), "mfu": round(flops / bdjax_s / 1e9 / peak, 3)}
    if args.compare_attention:
        xla_s = times["bdjax_xla"]
        result.update(bdjax_xla_attention_step_s=round(xla_s, 4), attention_speedup=round(xla_s / bdjax_s, 3))
    if args.compare_side_by_side:
        result.update(bdjax_side_by_side_step_s=round(times["bdjax_side_by_side"], 4))
    if workers:
        peft_s = times["peft_eager"]
        result.update(peft_eager_step_s=round(peft_s, 4), peft_tokens_per_s=round(n_tokens / peft_s, 1),
                      speedup_vs_peft_eager=round(peft_s / bdjax_s, 2), torch_threads=workers[0].threads,
                      torch_version=workers[0].version)
    for name in times:
        if name.startswith("peft") and name != "peft_eager":
            result.update({f"{name}_step_s": round(times[name], 4),
                           f"speedup_vs_{name}": round(times[name] / bdjax_s, 2)})
    result.update(jax_version=jax.__version__, **machine())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
