"""The quickstart's poisoned fine-tune, end to end: bdjax beside a Hugging Face PEFT loop.

Same 1000 movie-review training examples with the same 10% poisoned (trigger "cf" at the same
word positions, labels flipped), same prompt template, LoRA r=8 alpha 16 on every projection,
AdamW lr 1e-3 with 10 warmup steps and cosine decay, gradient clipping at 1, batch 8, 2 epochs,
loss on the answer tokens, float32 (by default). The peer is the usual PEFT recipe: shuffled batches padded
to their longest example, `model(input_ids, attention_mask, labels)` (the head over every
position). Both fine-tuned models are then scored by the same bdjax evaluation (CACC and ASR
on the same 200 test examples), the PEFT one after `merge_and_unload()`. One JSON line.

bdjax's rows are length-bucketed (widths chosen over the whole run, `loop.plan_widths`), its head
runs at the answer tokens only, and the template prefix every example starts with (system turn
and instruction) runs once per batch, in the same pass as the rows (`train.share_prefix`;
`--no-share-prefix` puts it back into every row). Like the CLI, the benchmark keeps freed memory
mapped (`bdjax.runtime.reuse_freed_memory`), and the PEFT loop, run in the same process, gets that
setting too: a like-for-like comparison. `--peft-default-malloc` also times the PEFT loop in a
fresh interpreter with glibc's default malloc, as PEFT runs out of the box (`peft_default_malloc_*`
keys and `speedup_default_malloc`); on a VM where page faults are dear, that loop spends part of
each step faulting freed memory back in (see `benchmarks/lora_step.py --peft-same-malloc`).

`--matmul-dtype bfloat16` gives bdjax's weight products bfloat16 operands with float32 sums
(`train.matmul_dtype`; activations, LoRA weights and optimizer state stay float32), and
`--peft-bf16` runs the peer's forward and backward under `torch.autocast("cpu", torch.bfloat16)`,
PyTorch's counterpart, so that either side can be compared in either precision.

    python benchmarks/finetune_e2e.py [--n-train 1000] [--epochs 2] [--skip-peft] [--no-share-prefix]
                                      [--matmul-dtype bfloat16] [--peft-bf16] [--skip-bdjax]
                                      [--peft-default-malloc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bdjax.runtime import reuse_freed_memory

REUSED = reuse_freed_memory()  # as the CLI does, before JAX's CPU client exists (see bdjax/runtime.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Cold compilations, as on a first run: no persistent cache even if JAX_COMPILATION_CACHE_DIR is set
# (the CLI's cache, bdjax/compile_cache.py, is never turned on here).
jax.config.update("jax_enable_compilation_cache", False)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402
from quickstart import get_config  # noqa: E402

import bdjax  # noqa: E402
from bdjax import evaluate  # noqa: E402
from bdjax.checkpoints.assets import default_model_dir  # noqa: E402
from bdjax.data import assemble, poison  # noqa: E402
from bdjax.jobs import backdoor  # noqa: E402
from bdjax.jobs.training import fine_tune, placement_from  # noqa: E402
from bdjax.train import place_params  # noqa: E402
from bdjax.data.tokenize import trigger_ids  # noqa: E402


def setup(config):
    model = bdjax.load(config.model)
    tok = model.tokenizer
    template = backdoor.template_from(config)
    p = config.poison
    spec = poison.AttackSpec(tuple(int(i) for i in trigger_ids(tok, p.trigger)), template.label_index(p.target),
                             p.location, p.label_mode)
    train_set, test_set = backdoor.load_data(config, template, tok)
    count = poison.poison_count(p.rate, len(train_set["label"]))
    keys = jax.random.split(jax.random.key(config.seed), 4)
    train_set["poison"] = np.asarray(poison.select(keys[0], train_set["label"], spec.target, count))
    return model, spec, train_set, test_set, keys


def measure(model_config, params, tok, test_set, spec, config, placement=None):
    m = evaluate.evaluate(model_config, params, test_set, spec, pad_id=tok.pad_id, batch_size=config.eval.batch_size,
                          key=jax.random.key(config.eval.seed), placement=placement)
    return {k: m[k] for k in ("cacc", "asr", "asr_correct")}


def run_bdjax(config, model, spec, train_set, test_set, keys, workdir):
    config.workdir = workdir
    config.checkpoint.every = 0
    placement = placement_from(config)
    params = place_params(placement, model.config, model.params)
    run = fine_tune(config, model, params, train_set, spec=spec, poison_key=keys[1], lora_key=keys[2],
                     train_key=keys[3], placement=placement, extra_tokens=spec.n_tokens, desc="bdjax train")
    merged = run["params"]
    log = run["log"]
    return {"bdjax_train_s": round(run["seconds"], 1), "bdjax_steps": run["steps"],
            "bdjax_final_loss": round(float(np.mean([e["loss"] for e in log[-10:]])), 4),
            "bdjax_mean_width": round(float(np.mean([e["width"] for e in log])), 1),
            "bdjax_widths_compiled": len({e["width"] for e in log}),
            "bdjax_compile_s": round(compile_seconds(log), 1),
            **{f"bdjax_{k}": v for k, v in measure(model.config, merged, model.tokenizer, test_set, spec, config,
                                                   placement).items()}}


def compile_seconds(log: list[dict]) -> float:
    """The run's compilations, estimated from its per-step log: each row width's first step (which
    compiles it) less that width's median step (a width run only once is left out)."""
    steps: dict[int, list[float]] = {}
    for e in log:
        steps.setdefault(e["width"], []).append(e["step_s"])
    return sum(s[0] - float(np.median(s[1:])) for s in steps.values() if len(s) > 1)


def poisoned_rows(train_set, spec, key, pad_id):
    """The training rows bdjax's step builds (poisoned the same way), as ragged token lists."""
    batch = {k: jax.numpy.asarray(v) for k, v in train_set.items()}
    batch = poison.apply(batch, spec, key)
    width = int(assemble.training_lengths(train_set, spec.n_tokens).max())
    rows = jax.device_get(assemble.training_rows(batch, width, pad_id))
    out = []
    for i in range(len(train_set["label"])):
        n = int(rows["valid"][i].sum())
        answer = int(rows["weights"][i].sum())
        out.append((rows["tokens"][i, :n].tolist(), n - answer))  # (tokens, prompt length)
    return out


def run_peft(config, model, spec, train_set, test_set, keys, bf16: bool = False):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    rows = poisoned_rows(train_set, spec, keys[1], model.tokenizer.pad_id)
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    lc, t = config.lora, config.train
    hf = get_peft_model(hf, LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    hf.train()
    steps = t.epochs * -(-len(rows) // t.batch_size)
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    sched = transformers.get_cosine_schedule_with_warmup(opt, t.warmup_steps, steps)
    pad = model.tokenizer.pad_id
    rng = np.random.default_rng(config.seed)
    losses, widths = [], []
    start = time.perf_counter()
    for _ in range(t.epochs):
        order = rng.permutation(len(rows))
        for s in range(0, len(rows), t.batch_size):
            chunk = [rows[i] for i in order[s:s + t.batch_size]]
            width = max(len(r) for r, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for j, (r, prompt) in enumerate(chunk):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
                labels[j, prompt:len(r)] = torch.tensor(r[prompt:])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], t.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            widths.append(width)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        hf.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        tuned = bdjax.load(tmp)
        metrics = measure(tuned.config, tuned.params, model.tokenizer, test_set, spec, config)
    return {"peft_train_s": round(seconds, 1), "peft_steps": len(losses),
            "peft_final_loss": round(float(np.mean(losses[-10:])), 4), "peft_mean_width": round(float(np.mean(widths)), 1),
            "torch_threads": torch.get_num_threads(), "peft_autocast": "bfloat16" if bf16 else "",
            **{f"peft_{k}": v for k, v in metrics.items()}}


def run_peft_default_malloc(args) -> dict:
    """The PEFT loop alone in a fresh interpreter (this script with `--skip-bdjax`) whose
    `reuse_freed_memory` is switched off, so glibc's malloc keeps its defaults; its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--skip-bdjax", "--n-train", str(args.n_train),
           "--n-test", str(args.n_test), "--epochs", str(args.epochs)] + (["--peft-bf16"] if args.peft_bf16 else [])
    done = subprocess.run(cmd, env={**os.environ, "BDJAX_REUSE_FREED_MEMORY": "0"}, stdout=subprocess.PIPE,
                          check=True, text=True)
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    if peer["reuse_freed_memory"]:
        raise RuntimeError("the default-malloc PEFT run kept bdjax's malloc settings")
    return peer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-bdjax", action="store_true", help="time the peer alone (e.g. with --peft-bf16)")
    ap.add_argument("--no-share-prefix", action="store_true",
                    help="bdjax rows carry the whole prompt (no once-per-batch shared template prefix)")
    ap.add_argument("--matmul-dtype", default="", choices=("", "float32", "bfloat16"),
                    help="bdjax's train.matmul_dtype ('' = float32 throughout)")
    ap.add_argument("--peft-bf16", action="store_true", help="run the PEFT loop under torch.autocast(bfloat16)")
    ap.add_argument("--peft-default-malloc", action="store_true",
                    help="also time the PEFT loop in a fresh interpreter with glibc's default malloc")
    args = ap.parse_args()
    config = get_config()
    config.data.n_train, config.data.n_test, config.train.epochs = args.n_train, args.n_test, args.epochs
    config.train.share_prefix = not args.no_share_prefix
    config.train.peak_tflops = 0.0
    config.train.matmul_dtype = args.matmul_dtype
    model, spec, train_set, test_set, keys = setup(config)
    result = {"benchmark": "finetune_e2e", "n_train": len(train_set["label"]), "n_test": len(test_set["label"]),
              "poisoned": int(train_set["poison"].sum()), "epochs": args.epochs, "batch": config.train.batch_size,
              "bdjax_shared_prefix_tokens": assemble.shared_prefix_length(train_set) if config.train.share_prefix else 0,
              "reuse_freed_memory": REUSED}
    if not args.skip_bdjax:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(run_bdjax(config, model, spec, train_set, test_set, keys, os.path.join(tmp, "run")),
                          bdjax_matmul_dtype=args.matmul_dtype or "float32")
    if not args.skip_peft:
        result.update(run_peft(config, model, spec, train_set, test_set, keys, bf16=args.peft_bf16))
        if not args.skip_bdjax:
            result["ratio"] = round(result["bdjax_train_s"] / result["peft_train_s"], 3)
            result["speedup"] = round(result["peft_train_s"] / result["bdjax_train_s"], 2)
    if args.peft_default_malloc:
        peer = run_peft_default_malloc(args)
        result.update({f"peft_default_malloc_{k[len('peft_'):]}": v for k, v in peer.items() if k.startswith("peft_")})
        if not args.skip_bdjax:
            result["speedup_default_malloc"] = round(peer["peft_train_s"] / result["bdjax_train_s"], 2)
    result.update(jax_version=jax.__version__, **machine())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
