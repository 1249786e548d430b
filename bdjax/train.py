"""LoRA fine-tuning: a pure jitted train step (poisoning inside it) and the loop around it.

Only the LoRA tree is differentiated and carries optimizer state; the frozen params enter the
step as a constant argument, so no full-size gradient of a frozen weight is ever formed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax.data import assemble, poison
from bdjax.errors import ConfigError
from bdjax.models.config import ModelConfig
from bdjax.models.llama import Opts, apply_rows, causal_rows

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    lora: Params
    opt_state: optax.OptState
    rng: jax.Array


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   end_lr_fraction: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine or linear decay to `end_lr_fraction * lr`."""
    if lr <= 0 or total_steps < 1:
        raise ConfigError(f"train.lr={lr} must be > 0 and the run must have at least one step ({total_steps})")
    warmup = min(warmup_steps, total_steps - 1)
    decay_steps = max(total_steps - warmup, 1)
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_fraction)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, lr * end_lr_fraction, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ConfigError(f"train.schedule={schedule!r} must be cosine, linear or constant")
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup else decay
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    return optax.chain(*parts, optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def answer_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed weighted negative log-likelihood of `targets` and the weight total."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * weights).sum(), weights.sum()


def row_loss(config: ModelConfig, params: Params, lora: Params, rows: dict[str, jax.Array], opts: Opts,
             remat: str, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over answer tokens, and the number of answer tokens."""
    positions, mask = causal_rows(config, rows["valid"])
    logits = apply_rows(config, params, rows["tokens"], positions, mask, logits_at=rows["logits_at"], lora=lora,
                        opts=opts, remat=remat, rngs=None if rng is None else {"dropout": rng})
    total, count = answer_nll(logits, rows["targets"], rows["weights"])
    return total / jnp.maximum(count, 1.0), count


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, *, pad_id: int,
                    spec: poison.AttackSpec | None, poison_key: jax.Array, alpha: float, dropout: float = 0.0,
                    dtype: Any = jnp.float32, remat: str = "none") -> Callable:
    """step(state, params, batch, width) -> (state, metrics); batch holds tokenized pieces and a
    `poison` flag; `width` (static) is the row length, one compilation per distinct width.

    Poisoning runs inside the step: flagged rows get the trigger (at a position fixed per example
    by `poison_key`) and, dirty-label, the target answer."""
    opts = Opts(dtype=dtype, lora_alpha=alpha, lora_dropout=dropout, deterministic=dropout == 0.0)

    def step(state: TrainState, params: Params, batch: dict[str, jax.Array], width: int):
        if spec is not None:
            batch = poison.apply(batch, spec, poison_key)
        rows = assemble.training_rows(batch, width, pad_id)
        rng, drop_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(
            lambda lora: row_loss(config, params, lora, rows, opts, remat, None if dropout == 0 else drop_rng),
            has_aux=True)
        (loss, count), grads = grad_fn(state.lora)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        metrics = {"loss": loss, "answer_tokens": count, "tokens": rows["valid"].sum(),
                   "grad_norm": optax.global_norm(grads)}
        return TrainState(state.step + 1, lora, opt_state, rng), metrics

    return jax.jit(step, static_argnums=(3,), donate_argnums=(0,))


def init_state(lora: Params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), lora, optimizer.init(lora), rng)


def bucketed_batches(pieces: dict[str, np.ndarray], batch_size: int, *, seed: int, extra_tokens: int = 0,
                     bucket: int = 16, pool_batches: int = 16) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """One shuffled epoch of (batch, row width). Examples are shuffled, cut into pools of
    `pool_batches` batches, sorted by length within a pool and batched, and the batches shuffled:
    rows of a batch have similar lengths, so little compute goes to padding, and each batch's width
    is its longest row rounded up to `bucket` tokens (few distinct widths, few compilations)."""
    from bdjax.data.tokenize import batches

    rng = np.random.default_rng(seed)
    n = len(pieces["label"])
    lengths = (assemble.prompt_length(pieces) + pieces["response_len"].max(axis=1) + extra_tokens)
    order = rng.permutation(n)
    pool = batch_size * pool_batches
    chunks = []
    for start in range(0, n, pool):
        idx = order[start:start + pool]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        chunks += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    for j in rng.permutation(len(chunks)):
        idx = chunks[j]
        width = assemble.round_up(lengths[idx].max(), bucket)
        yield next(batches(pieces, batch_size, order=idx)), width


def fit(step_fn: Callable, state: TrainState, params: Params, pieces: dict[str, np.ndarray], *, batch_size: int,
        epochs: int, seed: int, extra_tokens: int = 0, bucket: int = 16, progress=None,
        log: Callable[[dict], None] | None = None, flops_per_token: float | None = None,
        peak_flops: float | None = None) -> tuple[TrainState, list[dict]]:
    """Run `epochs` shuffled, length-bucketed passes over the tokenized pieces; returns the final
    state and per-step logs. `extra_tokens` reserves room in each row (e.g. for a trigger)."""
    history = []
    for epoch in range(epochs):
        for batch, width in bucketed_batches(pieces, batch_size, seed=seed * 1000 + epoch,
                                             extra_tokens=extra_tokens, bucket=bucket):
            start = time.perf_counter()
            state, metrics = step_fn(state, params, batch, width)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - start
            entry = {"step": int(state.step), "epoch": epoch, "width": width, **metrics, "step_s": seconds,
                     "tokens_per_s": metrics["tokens"] / seconds}
            if flops_per_token and peak_flops:
                entry["mfu"] = flops_per_token * metrics["tokens"] / seconds / peak_flops
            history.append(entry)
            if log is not None:
                log(entry)
            if progress is not None:
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                progress.update(1)
    return state, history


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
