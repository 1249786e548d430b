"""Fine-tuning: a pure jitted train step (poisoning inside it).

LoRA mode (the default): only the LoRA tree is differentiated and carries optimizer state; the
frozen params enter the step as a constant argument, so no full-size gradient of a frozen weight
is ever formed. Full mode (`StepSpec.full`): every parameter, embeddings included, is trained,
and the optimizer moments are sharded like the params.

The step is jitted with explicit shardings over a `Placement`'s mesh (params by logical axes,
batches over data×fsdp, state donated) and optionally accumulates gradients over microbatches.
The loop around the step (data order, resume position, logs) is `bdjax/loop.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bdjax import lora as lora_lib
from bdjax.data import assemble, poison
from bdjax.errors import ConfigError
from bdjax.kernels import attention as fused_attention
from bdjax.models.config import ModelConfig
from bdjax.models.cache import prefix_kv
from bdjax.models.llama import Opts, check_remat, logical_axes
from bdjax.models.rows import apply_rows, causal_rows, prefixed_rows
from bdjax.regularize import Regularizer, param_penalty
from bdjax.sharding import Placement

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Params  # the LoRA tree, or every parameter under full fine-tuning
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


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] over the last axis, as logsumexp(logits) - logits[target].

    Never materializes log_softmax, and the backward is one fused pass, softmax - onehot(target),
    instead of autodiff's scatter of the gathered gradient into a zero-filled [.., vocab] array
    plus the log_softmax transpose (measured on CPU, SmolLM2 8x128: see benchmarks/lora_step.py)."""
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked, (logits, lse, targets)


def _token_nll_bwd(res, g):
    logits, lse, targets = res
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    dlogits = (jnp.exp(logits - lse[..., None]) - onehot) * g[..., None]
    return dlogits.astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def answer_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed weighted negative log-likelihood of `targets` and the weight total."""
    nll = token_nll(logits, targets)
    return (nll * weights).sum(), weights.sum()


def row_nll(config: ModelConfig, params: Params, lora: Params, rows: dict[str, jax.Array], opts: Opts,
            remat: str, rng: jax.Array | None, *, attention: bool = False,
            prefix: jax.Array | None = None, pack_prefix: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed next-token cross-entropy over answer tokens, the number of answer tokens and, with
    `attention`, the summed (over real rows) attention concentration of the summarizing position —
    the last prompt token, whose logits predict the answer's first token (else 0). With `prefix`
    [P], every row continues those tokens (`training_rows(shared_prefix=P)`), run once here: with
    `pack_prefix` in the same pass as the rows (one token stream, so each weight runs at P + B·W
    rows at once; the rows must not be sharded), else first on its own and read by the rows as
    keys and values."""
    kv = packed = None
    if prefix is None:
        positions, mask = causal_rows(config, rows["valid"])
    else:
        positions, mask = prefixed_rows(config, rows["valid"], prefix.shape[0])
        if pack_prefix:
            packed = prefix
        else:
            prefix_rng = None
            if rng is not None:
                rng, prefix_rng = jax.random.split(rng)
            kv = prefix_kv(config, params, prefix, lora=lora, opts=opts, remat=remat,
                           rngs=None if prefix_rng is None else {"dropout": prefix_rng})
    out = apply_rows(config, params, rows["tokens"], positions, mask, logits_at=rows["logits_at"], lora=lora,
                     opts=opts, remat=remat, rngs=None if rng is None else {"dropout": rng},
                     summary_at=rows["logits_at"][:, 0] if attention else None, prefix=kv, prefix_tokens=packed)
    logits, conc = out if attention else (out, None)
    total, count = answer_nll(logits, rows["targets"], rows["weights"])
    if not attention:
        return total, count, jnp.zeros((), jnp.float32)
    real = (rows["weights"].sum(axis=1) > 0).astype(jnp.float32)
    return total, count, (conc.mean(axis=0) * real).sum()


def row_loss(config: ModelConfig, params: Params, lora: Params, rows: dict[str, jax.Array], opts: Opts,
             remat: str, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over answer tokens, and the number of answer tokens."""
    total, count, _ = row_nll(config, params, lora, rows, opts, remat, rng)
    return total / jnp.maximum(count, 1.0), count


def _microbatches(tree: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...] taking rows i, i+k, ...: each microbatch spans every batch shard."""
    return {n: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1) for n, x in tree.items()}


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything that fixes the compiled train step, besides the shapes."""

    config: ModelConfig
    optimizer: optax.GradientTransformation
    pad_id: int
    spec: poison.AttackSpec | None
    alpha: float
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: str = "none"
    grad_accum: int = 1
    matmul_dtype: Any = None  # operands of the weight products (e.g. bfloat16, float32 accumulation); None: dtype
    full: bool = False  # train the params themselves (all, or a subset over a frozen rest), not a LoRA
    reg: Regularizer | None = None  # extra loss terms (re-tuning defenses)
    answer_tokens: int = 0  # the loss covers the first this many answer tokens (0: all)
    share_prefix: bool = True  # run the template prefix every example shares once per (micro)batch
    pack_prefix: bool = False  # ...in the same pass as the rows (only where the batch is not sharded)
    attention: str = "auto"  # Opts.attention: the fused CPU attention kernel where it applies, or "xla"
    lora_side_by_side: bool = False  # Opts.lora_side_by_side


def train_step(s: StepSpec, state: TrainState, params: Params, batch: dict[str, jax.Array],
               poison_key_data: jax.Array, anchor: Params | None = None, prefix: jax.Array | None = None, *,
               width: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of tokenized pieces (poisoned here when `s.spec`, with
    insertion points drawn from the raw key data `poison_key_data`). The loss is the mean answer
    cross-entropy plus, with `s.reg`, its terms (`anchor` is the L2 term's reference, see
    `bdjax.regularize.anchor_tree`). With `prefix` [P] (the first P prefix tokens, the same in
    every example), rows of `width` tokens hold the rest and the prefix is run once."""
    opts = Opts(dtype=s.dtype, lora_alpha=s.alpha, lora_dropout=s.dropout, deterministic=s.dropout == 0.0,
                matmul_dtype=s.matmul_dtype, attention=s.attention, lora_side_by_side=s.lora_side_by_side)
    if s.spec is not None:
        batch = poison.apply(batch, s.spec, jax.random.wrap_key_data(poison_key_data))
    shared = 0 if prefix is None else prefix.shape[0]
    rows = assemble.training_rows(batch, width, s.pad_id, answer_tokens=s.answer_tokens, shared_prefix=shared)
    rng, drop_rng = jax.random.split(state.rng)

    reg = s.reg if s.reg is not None and s.reg.active else None
    attention = reg is not None and reg.attention > 0
    # Both normalizers depend on the data only, so every microbatch's gradient is already scaled
    # for the whole batch and the accumulated sum is the exact gradient of the batch loss.
    count = rows["weights"].sum()
    denom = jnp.maximum(count, 1.0)
    n_rows = jnp.maximum((rows["weights"].sum(axis=1) > 0).sum().astype(jnp.float32), 1.0)

    def grads_of(rows, key):
        drop = None if s.dropout == 0 else key

        def f(trainable):
            # full: the trained tree over the frozen rest (e.g. a soft prompt, trained or frozen)
            p, lo = ({**params, **trainable}, None) if s.full else (params, trainable)
            total, _, aux = row_nll(s.config, p, lo, rows, opts, s.remat, drop, attention=attention, prefix=prefix,
                                    pack_prefix=s.pack_prefix)
            loss = total / denom + (reg.attention * aux / n_rows if attention else 0.0)
            return loss, (total, aux)
        (_, (total, aux)), g = jax.value_and_grad(f, has_aux=True)(state.trainable)
        return (total, aux), g

    if s.grad_accum == 1:
        (total, aux), grads = grads_of(rows, drop_rng)
    else:
        def body(carry, xs):
            micro, key = xs
            (t, a), g = grads_of(micro, key)
            return jax.tree.map(jnp.add, carry, (t, a, g)), None
        zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.trainable))
        keys = jax.random.split(drop_rng, s.grad_accum)
        (total, aux, grads), _ = jax.lax.scan(body, zero, (_microbatches(rows, s.grad_accum), keys))
    extra = {}
    if reg is not None:
        pen = lambda t: param_penalty(reg, t, anchor, full=s.full, alpha=s.alpha)
        penalty, g_pen = jax.value_and_grad(pen)(state.trainable)
        grads = jax.tree.map(jnp.add, grads, g_pen)
        extra = {"penalty": penalty}
        if attention:
            extra["attn_concentration"] = aux / n_rows
    updates, opt_state = s.optimizer.update(grads, state.opt_state, state.trainable)
    trained = optax.apply_updates(state.trainable, updates)
    # tokens through the model: each row's, plus the shared prefix once per microbatch
    lengths = rows["valid"].sum(axis=1).astype(jnp.float32)
    runs = s.grad_accum if shared else 0
    metrics = {"loss": total / denom, "answer_tokens": count, "tokens": lengths.sum() + runs * shared,
               "attended": (lengths * (lengths + shared)).sum() + runs * shared * shared,
               "grad_norm": optax.tree.norm(grads), **extra}
    return TrainState(state.step + 1, trained, opt_state, rng), metrics


def state_shardings(placement: Placement, s: StepSpec, trainable: Params) -> TrainState:
    """Shardings of the train state: the trained tree by its logical axes (LoRA's from the base
    kernels'), optimizer moments like the leaves they track, counters and the PRNG key replicated."""
    axes = (logical_axes(s.config, like=trainable) if s.full
            else lora_lib.logical_axes(trainable, logical_axes(s.config)))
    tree_sh = placement.tree_shardings(trainable, axes)
    opt_shapes = jax.eval_shape(s.optimizer.init, trainable)
    opt_sh = optax.tree_map_params(s.optimizer, lambda _, sh: sh, opt_shapes, tree_sh,
                                   transform_non_params=lambda _: placement.replicated)
    return TrainState(placement.replicated, tree_sh, opt_sh, placement.replicated)


def param_shardings(placement: Placement, config: ModelConfig, params: Params) -> Params:
    """Shardings of a params tree (or of nothing: {} stays {}, the frozen base of full fine-tuning)."""
    return placement.tree_shardings(params, logical_axes(config, like=params)) if params else {}


def place_params(placement: Placement, config: ModelConfig, params: Params) -> Params:
    """The params (host or device arrays) put on the placement's mesh with their logical shardings."""
    return placement.put(jax.device_get(params), param_shardings(placement, config, params))


class TrainStep:
    """`step(state, params, batch, width) -> (state, metrics)`, compiled once per row width with
    explicit in/out shardings over the placement's mesh; the state is donated."""

    def __init__(self, s: StepSpec, placement: Placement, poison_key: jax.Array, trainable: Params,
                 params: Params, anchor: Params | None = None):
        if s.grad_accum < 1:
            raise ConfigError(f"train.grad_accum={s.grad_accum} must be at least 1")
        self.spec, self.placement = s, placement
        self.poison_key = placement.put_replicated(np.asarray(jax.random.key_data(poison_key)))
        self.state_sh = state_shardings(placement, s, trainable)
        self.param_sh = param_shardings(placement, s.config, params)
        # the L2 reference lives beside what it anchors: the params (full) or the LoRA-targeted kernels
        self.anchor_sh = self.anchor = None
        if anchor is not None:
            self.anchor_sh = self.state_sh.trainable if s.full else placement.tree_shardings(
                anchor, lora_lib.kernel_axes(anchor, logical_axes(s.config)))
            self.anchor = placement.put(jax.device_get(anchor), self.anchor_sh)
        self._compiled: dict[int, Callable] = {}

    def jitted(self, width: int) -> Callable:
        if width not in self._compiled:
            p = self.placement
            self._compiled[width] = jax.jit(
                functools.partial(train_step, self.spec, width=width),
                in_shardings=(self.state_sh, self.param_sh, p.batch_sharding(), p.replicated, self.anchor_sh,
                              p.replicated),
                out_shardings=(self.state_sh, p.replicated), donate_argnums=(0,))
        return self._compiled[width]

    def __call__(self, state: TrainState, params: Params, batch: dict[str, jax.Array], width: int,
                 prefix: jax.Array | None = None):
        """`prefix`: the shared prefix tokens that `batch`'s rows leave out (see `train_step`)."""
        with self.placement.activate():
            return self.jitted(width)(state, params, batch, self.poison_key, self.anchor, prefix)

    def lower(self, state, params, batch, width: int):
        """Lower on (possibly abstract) arguments: `.compile()` it for memory and cost analysis."""
        with self.placement.activate():
            return self.jitted(width).lower(state, params, batch, self.poison_key, self.anchor, None)

    def init_state(self, trainable: Params, rng: jax.Array) -> TrainState:
        """A fresh state from host values of the trained tree, placed by the step's state shardings."""
        trainable = self.placement.put(jax.device_get(trainable), self.state_sh.trainable)
        raw = self.placement.put_replicated(np.asarray(jax.random.key_data(rng)))
        make = lambda lo, r: TrainState(jnp.zeros((), jnp.int32), lo, self.spec.optimizer.init(lo),
                                        jax.random.wrap_key_data(r))
        return jax.jit(make, out_shardings=self.state_sh)(trainable, raw)


def init_state(trainable: Params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), rng)


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, *, pad_id: int,
                    spec: poison.AttackSpec | None, poison_key: jax.Array, alpha: float, dropout: float = 0.0,
                    dtype: Any = jnp.float32, remat: str = "none", grad_accum: int = 1,
                    placement: Placement | None = None, trainable: Params, params: Params,
                    full: bool = False, reg: Regularizer | None = None, anchor: Params | None = None,
                    answer_tokens: int = 0, share_prefix: bool = True, pack_prefix: bool | None = None,
                    matmul_dtype: Any = None, attention: str = "auto", lora_side_by_side: bool = False) -> TrainStep:
    """The train step over `placement` (default: data parallelism over every device). `trainable`
    (the LoRA tree, or with `full` the params themselves) and `params` (the frozen base; {} with
    `full`, or the rest of the params when `trainable` is a subset of them), as arrays or
    ShapeDtypeStructs, fix the state and parameter shardings. `reg` adds loss terms; its L2 term
    needs `anchor` (`bdjax.regularize.anchor_tree`). `answer_tokens` > 0 limits the loss to the
    first tokens of each answer. With `share_prefix`, `fit` runs the template prefix that every
    example starts with once per batch instead of once per row (the same loss and gradient, in
    a different float summation order): by default (`pack_prefix=None`) in the same pass as the
    rows where the batch is not sharded (one device, or tensor parallelism only), else on its own.
    `matmul_dtype` (e.g. bfloat16) rounds the operands of every weight product, forward and
    backward, and sums in float32; activations, attention, norms and LoRA stay in `dtype`.
    `attention` is `Opts.attention` ("auto": the fused CPU kernel where it applies; "xla"), and
    `lora_side_by_side` is `Opts.lora_side_by_side` (rank-r products in the merged GEMMs' extra columns)."""
    if reg is not None and reg.l2 and anchor is None:
        raise ConfigError("the l2 regularizer needs the pretrained params as its anchor")
    if answer_tokens < 0:
        raise ConfigError(f"answer_tokens={answer_tokens} must be >= 0 (0: the whole answer)")
    placement = placement or Placement.create()
    # A packed prefix shares one token stream with the rows, which then cannot be split over
    # batch shards; there, the prefix runs on its own (replicated) and the rows read its keys/values.
    if pack_prefix is None:
        pack_prefix = placement.can_pack_prefix
    elif pack_prefix and not placement.can_pack_prefix:
        raise ConfigError(f"pack_prefix needs an unsharded batch; this mesh splits it {placement.batch_shards} ways")
    fused_attention.check_mode(attention, "train.attention")
    check_remat(remat)
    s = StepSpec(config, optimizer, pad_id, spec, alpha, dropout, dtype, remat, grad_accum, matmul_dtype, full, reg,
                 answer_tokens, share_prefix, pack_prefix=share_prefix and pack_prefix, attention=attention,
                 lora_side_by_side=lora_side_by_side)
    return TrainStep(s, placement, poison_key, trainable, params,
                     anchor if reg is not None and reg.l2 else None)
