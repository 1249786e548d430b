"""The LoRA training run shared by jobs: placement on the recipe's mesh, resume from the run's
checkpoints, per-step metrics (JSONL, TensorBoard, progress bar) and exports.

Run directory (`config.workdir`): `checkpoints/` (orbax; resumed automatically), `train_log.jsonl`
and `tensorboard/` live during training; jobs add their results at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from bdjax import lora as lora_lib
from bdjax import loop, train
from bdjax.api import resolve_dtype
from bdjax.checkpointing import RunCheckpoints
from bdjax.errors import ConfigError
from bdjax.flops import peak_flops
from bdjax.metrics import MetricsLog
from bdjax.sharding import Placement

# Settings that do not change a run's trajectory: a resumed run may differ in these.
_NOT_TRAJECTORY = ("workdir", "eval", "export", "checkpoint", "mesh")


def step_dtypes(t: ml_collections.ConfigDict, default: Any) -> tuple[Any, Any]:
    """The train step's (compute, matmul) dtypes from the `train` section: `compute_dtype` ("" =
    `default`, the model's dtype) and `matmul_dtype` ("" = the compute dtype)."""
    compute = resolve_dtype(t.get("compute_dtype") or default)
    return compute, resolve_dtype(t.get("matmul_dtype") or compute)


def placement_from(config: ml_collections.ConfigDict) -> Placement:
    m = config.get("mesh") or ml_collections.ConfigDict({"data": -1})
    sizes = {a: m.get(a, 1) for a in ("data", "fsdp", "tensor")}
    return Placement.create(sizes, m.get("rules"))


def is_main() -> bool:
    return jax.process_index() == 0


def merged_params(placement: Placement, model_config, params, lora, alpha: float):
    """Base params with the LoRA folded in, computed where the params live (same shardings)."""
    sh = train.param_shardings(placement, model_config, params)
    return jax.jit(lambda p, lo: lora_lib.merge(p, lo, alpha=alpha), out_shardings=sh)(params, lora)


MODES = ("lora", "full")


def train_mode(config: ml_collections.ConfigDict) -> str:
    mode = config.train.get("mode", "lora")
    if mode not in MODES:
        raise ConfigError(f"train.mode={mode!r} must be one of {MODES}")
    return mode


def fine_tune(config: ml_collections.ConfigDict, model, params, train_set: dict[str, np.ndarray], *,
              spec, poison_key: jax.Array, lora_key: jax.Array, train_key: jax.Array, placement: Placement,
              extra_tokens: int = 0, desc: str = "train", step_cache: dict | None = None) -> dict:
    """Fine-tune `params` (already placed) on the tokenized `train_set` per the recipe: LoRA
    (`train.mode="lora"`) or every parameter (`"full"`). Resumes from `workdir/checkpoints` when it
    holds this run's checkpoints. Returns the state, the tuned params, the log and the seconds.
    Runs that share a `step_cache` and differ only in data (e.g. the poison rate) share the
    compiled train steps."""
    t, lc = config.train, config.lora
    full = train_mode(config) == "full"
    n = len(train_set["label"])
    placement.check_batch(t.batch_size)
    accum = t.get("grad_accum", 1)
    if t.batch_size % (accum * placement.batch_shards):
        raise ConfigError(f"train.batch_size={t.batch_size} must split into train.grad_accum={accum} microbatches "
                          f"that are each divisible by the data-parallel size {placement.batch_shards}")
    steps = t.epochs * loop.steps_per_epoch(n, t.batch_size)
    optimizer = train.make_optimizer(lr=t.lr, total_steps=steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                                     weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)
    compute, matmul = step_dtypes(t, model.dtype)
    if full:  # the params themselves are trained; nothing stays frozen
        trainable, frozen = params, {}
    else:
        trainable, frozen = lora_lib.init(params, lora_key, rank=lc.rank, targets=lc.targets), params  # float32
    key = (spec, full, steps, np.asarray(jax.random.key_data(poison_key)).tobytes())
    step_fn = (step_cache or {}).get(key)
    if step_fn is None:
        step_fn = train.make_train_step(model.config, optimizer, pad_id=model.tokenizer.pad_id, spec=spec,
                                        poison_key=poison_key, alpha=lc.alpha, dropout=lc.dropout, dtype=compute,
                                        remat=t.remat, grad_accum=accum, placement=placement, trainable=trainable,
                                        params=frozen, full=full, share_prefix=t.get("share_prefix", True),
                                        matmul_dtype=matmul, attention=t.get("attention", "auto"),
                                        lora_side_by_side=t.get("lora_side_by_side", False))
        if step_cache is not None:
            step_cache[key] = step_fn
    state = step_fn.init_state(trainable, train_key)

    workdir = Path(config.workdir)
    ck = config.get("checkpoint") or ml_collections.ConfigDict({"every": 0})
    trajectory = {k: v for k, v in config.to_dict().items() if k not in _NOT_TRAJECTORY}
    checkpoints = None
    start = loop.Position()
    if ck.get("every", 0) > 0:
        checkpoints = RunCheckpoints(workdir / "checkpoints", every=ck.every, keep=ck.keep,
                                     asynchronous=ck.asynchronous, config=trajectory)
        restored = checkpoints.restore(state)
        if restored is not None:
            state, start = restored
    main = is_main()
    log = MetricsLog(workdir, resume_step=int(state.step), enabled=main, name="train_log.jsonl")
    peak = (t.get("peak_tflops") or 0) * 1e12 or peak_flops(jax.numpy.dtype(matmul).name)
    resumed_at = int(state.step)

    def after_step(state, entry, position):
        log.write(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                        mfu=f"{entry.get('mfu', 0):.2f}")
        bar.update(1)
        if checkpoints is not None:
            checkpoints.save(state, position)

    begin = time.perf_counter()
    try:
        with tqdm(total=steps, initial=resumed_at, desc=desc, disable=not main) as bar:
            state, _ = loop.fit(step_fn, state, frozen, train_set, batch_size=t.batch_size, epochs=t.epochs,
                                seed=config.seed, extra_tokens=extra_tokens, start=start, after_step=after_step,
                                peak_flops=peak, bucket=t.get("bucket", 8),
                                compile_cost=t.get("width_compile_cost", loop.COMPILE_COST))
        if checkpoints is not None:
            checkpoints.save(state, loop.Position(t.epochs, 0), force=checkpoints.latest_step() != int(state.step))
    finally:
        if checkpoints is not None:
            checkpoints.close()
        log.close()
    seconds = time.perf_counter() - begin
    history = log.entries() if main else []
    tuned = state.trainable if full else merged_params(placement, model.config, params, state.trainable, lc.alpha)
    return {"state": state, "params": tuned, "mode": "full" if full else "lora", "log": history, "seconds": seconds,
            "steps": steps, "resumed_at": resumed_at, "peak_flops": peak}


def export(config: ml_collections.ConfigDict, run: dict, model_config, tokenizer) -> None:
    """Write a fine-tune's exports into the workdir as `config.export` asks: `final/` (the tuned
    params as an HF checkpoint) and, for LoRA runs, `adapter/` (PEFT format). Every process must
    call it (the arrays are gathered from all of them); only process 0 writes."""
    from bdjax.checkpoints import save_hf_dir
    from bdjax.checkpoints.peft import save_peft_adapter
    from bdjax.sharding import fetch

    ex = config.get("export") or ml_collections.ConfigDict({"merged": True, "adapter": True})
    lc = config.lora
    host_lora = fetch(run["state"].trainable) if run["mode"] == "lora" and ex.adapter else None
    host_tuned = fetch(run["params"]) if ex.merged else None
    if not is_main():
        return
    out = Path(config.workdir)
    if host_tuned is not None:
        save_hf_dir(out / "final", model_config, host_tuned, tokenizer)
    if host_lora is not None:
        save_peft_adapter(out / "adapter", host_lora, alpha=lc.alpha, base_model=str(config.model),
                          dropout=lc.dropout)
