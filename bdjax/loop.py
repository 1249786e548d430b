"""The training loop around a `TrainStep`: shuffled, length-bucketed epochs and per-step logs.

The data order is a pure function of (seed, epoch), so a run resumed at a `Position`
(epoch, batch) sees the same batches as an uninterrupted one; each process materializes only its
own rows of a batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bdjax.data import assemble
from bdjax.data.tokenize import subset
from bdjax.flops import lora_step_flops, matmul_flops_per_token
from bdjax.models.config import ModelConfig
from bdjax.train import TrainState, TrainStep

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One global batch: example indices (the last batch padded by repeats), which are real, and
    the row width."""

    index: np.ndarray
    valid: np.ndarray
    width: int


# What compiling one more row width costs, in row tokens × steps: the default of `fit`. Measured
# for the SmolLM2-135M LoRA step on a 2-core CPU: a compilation takes ~6 s, and each token of row
# width adds ~0.025 s to a step of 8 rows.
COMPILE_COST = 240.0


def epoch_batches(lengths: np.ndarray, batch_size: int, *, seed: int, bucket: int = 8,
                  pool_batches: int = 16) -> list[Batch]:
    """One shuffled epoch, length-bucketed: examples are shuffled, cut into pools of `pool_batches`
    batches, sorted by length within a pool and batched, and the batches shuffled. Rows of a batch
    have similar lengths, so little compute goes to padding, and each batch's width is its longest
    row rounded up to `bucket` tokens (`run_plan` then folds rarely needed widths into larger ones)."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    order = rng.permutation(n)
    pool = batch_size * pool_batches
    chunks = []
    for start in range(0, n, pool):
        idx = order[start:start + pool]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        chunks += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    out = []
    for j in rng.permutation(len(chunks)):
        idx = chunks[j]
        valid = np.arange(batch_size) < len(idx)
        padded = np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))])
        out.append(Batch(padded, valid, assemble.round_up(int(lengths[idx].max()), bucket)))
    return out


def plan_widths(widths: list[int], compile_cost: float) -> dict[int, int]:
    """The row widths to compile for a run whose batches need `widths` (each batch's longest row,
    rounded): each batch runs at the smallest compiled width that holds it, and the compiled set
    minimizes the run's total row width (steps × tokens, the part of the step time that padding
    grows) plus `compile_cost` per compiled width. Returns {needed width: compiled width}.

    A width needed by a handful of batches is then folded into the next larger one when its
    compilation would cost more than their padding; `compile_cost=0` compiles every needed width.
    Exact, by dynamic programming over the sorted distinct widths (the largest is always compiled)."""
    need = sorted(set(widths))
    count = [widths.count(w) for w in need]
    # best[i]: the lowest cost of the batches needing need[:i + 1] with need[i] compiled; prev: the
    # compiled width before it (-1: none)
    best, prev = [], []
    for i, w in enumerate(need):
        options = []
        for j in range(-1, i):
            covered = sum(count[j + 1:i + 1])  # batches that run at width w
            options.append(((best[j] if j >= 0 else 0.0) + compile_cost + covered * w, j))
        cost, j = min(options)
        best.append(cost)
        prev.append(j)
    out, i = {}, len(need) - 1
    while i >= 0:
        j = prev[i]
        out.update({w: need[i] for w in need[j + 1:i + 1]})
        i = j
    return out


def run_plan(lengths: np.ndarray, batch_size: int, *, epochs: int, seed: int, bucket: int = 8,
             compile_cost: float = COMPILE_COST) -> list[list[Batch]]:
    """Every epoch's batches (`epoch_batches` with seed `seed * 1000 + epoch`), their widths
    chosen over the whole run by `plan_widths`: a pure function of its arguments, so a resumed
    run sees the same batches at the same widths."""
    plans = [epoch_batches(lengths, batch_size, seed=seed * 1000 + e, bucket=bucket) for e in range(epochs)]
    widths = plan_widths([b.width for plan in plans for b in plan], compile_cost)
    return [[dataclasses.replace(b, width=widths[b.width]) for b in plan] for plan in plans]


@dataclasses.dataclass
class Position:
    """Where a run is in its data: `batch` batches of `epoch` are done."""

    epoch: int = 0
    batch: int = 0


def fit(step_fn: TrainStep, state: TrainState, params: Params, pieces: dict[str, np.ndarray], *,
        batch_size: int, epochs: int, seed: int, extra_tokens: int = 0, bucket: int = 8,
        compile_cost: float = COMPILE_COST, start: Position | None = None,
        after_step: Callable[[TrainState, dict, Position], None] | None = None,
        peak_flops: float | None = None) -> tuple[TrainState, list[dict]]:
    """Run `epochs` shuffled, length-bucketed passes over the tokenized pieces from `start`;
    returns the final state and per-step logs. Each process gathers only its rows of a batch.
    Row widths are multiples of `bucket`, chosen by `plan_widths` with `compile_cost`.

    Every log entry carries loss, tokens/s, tokens/s/device and (with `peak_flops` per device)
    MFU; `after_step(state, entry, position)` sees each (for checkpoints, logs, progress)."""
    placement = step_fn.placement
    placement.check_batch(batch_size)
    rows = placement.local_rows(batch_size)
    shared = assemble.shared_prefix_length(pieces) if step_fn.spec.share_prefix else 0
    prefix = placement.put_replicated(np.asarray(pieces["prefix"][0, :shared], np.int32)) if shared else None
    lengths = assemble.training_lengths(pieces, extra_tokens, shared)
    config = step_fn.spec.config
    start = start or Position()
    history = []
    plans = run_plan(lengths, batch_size, epochs=epochs, seed=seed, bucket=bucket, compile_cost=compile_cost)
    for epoch in range(start.epoch, epochs):
        plan = plans[epoch]
        for i in range(start.batch if epoch == start.epoch else 0, len(plan)):
            b = plan[i]
            local = {**subset(pieces, b.index[rows]), "valid": b.valid[rows]}
            begin = time.perf_counter()
            state, metrics = step_fn(state, params, placement.put_batch(local, batch_size), b.width, prefix)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - begin
            entry = {"step": int(state.step), "epoch": epoch, "width": b.width, **metrics, "step_s": seconds,
                     "tokens_per_s": metrics["tokens"] / seconds,
                     "tokens_per_s_per_device": metrics["tokens"] / seconds / placement.n_devices}
            if peak_flops:
                flops = step_model_flops(config, metrics, full=step_fn.spec.full)
                entry["mfu"] = flops / seconds / (peak_flops * placement.n_devices)
            history.append(entry)
            if after_step is not None:
                after_step(state, entry, Position(epoch, i + 1))
    return state, history


def step_model_flops(config: ModelConfig, metrics: dict[str, float], *, full: bool = False) -> float:
    """Model FLOPs of a train step from its metrics: real (unpadded) tokens through the layers,
    the head at answer tokens only, attention over each row's real length squared. A LoRA step
    has no weight gradients (4·N per token); full fine-tuning adds them (6·N)."""
    flops = lora_step_flops(config, int(metrics["tokens"]), 1, logits_tokens=int(metrics["answer_tokens"]),
                            attended=metrics["attended"])
    if full:
        layers, head = matmul_flops_per_token(config)
        flops += 2 * (metrics["tokens"] * layers + metrics["answer_tokens"] * head)
    return flops


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
