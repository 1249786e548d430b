"""Re-tuning defenses: fine-tune the backdoored model on a small clean set.

- Clean re-tuning (Raghuram, Kesidis & Miller 2024, arXiv 2406.07778, defense (ii)): ordinary
  fine-tuning (LoRA or every parameter) on clean downstream data; the backdoor fades as the
  clean task is re-learned.
- With `l2 > 0`, a pull toward the pretrained weights (λ·Σ‖θ − θ_pre‖²).
- OSFT (Li et al. 2024, "Simulate and Eliminate", arXiv 2405.07667, the known-trigger case): with
  `trigger` token ids, the trigger is inserted (inside the jitted step, as the attack did) into a
  `trigger_fraction` of the clean examples whose answers stay correct, so the model unlearns the
  trigger → target mapping directly.
- Obliviate (Kim et al. 2024, arXiv 2409.14119): LoRA re-tuning with −λ_amp·Σ‖θ_lora‖₂ (amplify the
  benign update) and +λ_attn·mean‖A_s‖₂ (spread the summarizing position's attention); the paper's
  defaults are λ_amp = 1e-3, λ_attn = 1e-2 (`obliviate()`).
The regularizer math lives in `bdjax.regularize`; the step and loop are `bdjax.train`'s. Training
is deterministic given the key, so the transform is a pure function of its inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from bdjax import lora as lora_lib
from bdjax import loop, train
from bdjax.data import poison
from bdjax.errors import ConfigError
from bdjax.models.config import ModelConfig
from bdjax.models.llama import SOFT_PROMPT
from bdjax.regularize import Regularizer, anchor_tree
from bdjax.sharding import Placement

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RetuneSettings:
    mode: str = "lora"  # lora | full
    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = lora_lib.ALL_PROJECTIONS
    remat: str = "dots"
    l2: float = 0.0
    amplify: float = 0.0
    attention: float = 0.0
    trigger: tuple[int, ...] = ()  # OSFT: a known trigger's token ids
    trigger_location: str = "random"
    trigger_fraction: float = 1.0
    answer_tokens: int = 0  # the loss covers each answer's first this many tokens (0: all)

    def __post_init__(self):
        if not 0.0 < self.trigger_fraction <= 1.0:
            raise ConfigError(f"retune trigger_fraction={self.trigger_fraction} must be in (0, 1]")
        if self.mode not in ("lora", "full"):
            raise ConfigError(f"retune mode={self.mode!r} must be lora or full")
        if self.answer_tokens < 0:
            raise ConfigError(f"retune answer_tokens={self.answer_tokens} must be >= 0 (0: the whole answer)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"retune epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")


@dataclasses.dataclass(frozen=True, eq=False)
class Retune:
    """`t(params, *, pretrained, key) -> params` fine-tuned on `data` (tokenized clean pieces).

    A soft prompt in `params` (`bdjax.models.llama.SOFT_PROMPT`, e.g. SANDE's parrot) stays
    frozen: it is used by the data (`settings.trigger` may address its rows) and left out of the
    result."""

    config: ModelConfig
    data: dict[str, np.ndarray]
    pad_id: int
    settings: RetuneSettings
    placement: Placement | None = None
    name: str = "retune"

    def __call__(self, params: Params, *, pretrained: Params, key: jax.Array) -> Params:
        return self.run(params, pretrained=pretrained, key=key)["params"]

    def run(self, params: Params, *, pretrained: Params, key: jax.Array) -> dict:
        """The tuned params with the training log."""
        s = self.settings
        placement = self.placement or Placement.create()
        placement.check_batch(s.batch_size)
        n = len(self.data["label"])
        if n == 0:
            raise ConfigError("the clean defense set is empty")
        steps = s.epochs * loop.steps_per_epoch(n, s.batch_size)
        optimizer = train.make_optimizer(lr=s.lr, total_steps=steps, warmup_steps=s.warmup_steps, schedule=s.schedule,
                                         max_grad_norm=s.max_grad_norm)
        k_lora, k_train, k_data = jax.random.split(key, 3)
        params = train.place_params(placement, self.config, params)
        soft = {k: params[k] for k in (SOFT_PROMPT,) if k in params}
        params = {k: v for k, v in params.items() if k != SOFT_PROMPT}
        full = s.mode == "full"
        if full:
            trainable, frozen = params, soft
        else:
            trainable, frozen = lora_lib.init(params, k_lora, rank=s.rank, targets=s.targets), {**params, **soft}
        reg = Regularizer(s.l2, s.amplify, s.attention)
        anchor = anchor_tree(pretrained, params, None if full else trainable) if reg.l2 else None
        data, spec = self.data, None
        if s.trigger:  # OSFT: triggered inputs, answers untouched (clean-label insertion)
            spec = poison.AttackSpec(tuple(s.trigger), 0, s.trigger_location, "clean")
            chosen = np.zeros(n, bool)
            chosen[np.asarray(jax.random.permutation(k_data, n))[:max(1, round(s.trigger_fraction * n))]] = True
            data = {**data, "poison": chosen}
        step_fn = train.make_train_step(self.config, optimizer, pad_id=self.pad_id, spec=spec, poison_key=k_data,
                                        alpha=s.alpha, dropout=s.dropout, remat=s.remat, placement=placement,
                                        trainable=trainable, params=frozen, full=full, reg=reg, anchor=anchor,
                                        answer_tokens=s.answer_tokens)
        state, log = fit_with_progress(step_fn, step_fn.init_state(trainable, k_train), frozen, data,
                                       batch_size=s.batch_size, epochs=s.epochs, order_key=k_data, steps=steps,
                                       extra_tokens=spec.n_tokens if spec else 0, desc=self.name)
        tuned = state.trainable if full else lora_lib.merge(params, state.trainable, alpha=s.alpha)
        return {"params": tuned, "log": log, "steps": steps}


def fit_with_progress(step_fn: train.TrainStep, state: train.TrainState, frozen: Params, data: dict[str, np.ndarray],
                      *, batch_size: int, epochs: int, order_key: jax.Array, steps: int, extra_tokens: int,
                      desc: str) -> tuple[train.TrainState, list[dict]]:
    """`loop.fit` with the data order drawn from `order_key` and a progress bar (loss shown) on
    process 0: the loop of every defense that trains."""
    seed = int(jax.random.randint(order_key, (), 0, 2**31 - 1))
    with tqdm(total=steps, desc=desc, disable=jax.process_index() != 0) as bar:
        def after(state, entry, position):
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
            bar.update(1)
        return loop.fit(step_fn, state, frozen, data, batch_size=batch_size, epochs=epochs, seed=seed,
                        extra_tokens=extra_tokens, after_step=after)


def retune(config: ModelConfig, data: dict[str, np.ndarray], *, pad_id: int, placement: Placement | None = None,
           **settings) -> Retune:
    """Clean re-tuning on `data` (optionally with `l2`, `amplify`, `attention` terms)."""
    return Retune(config, data, pad_id, RetuneSettings(**settings), placement)


def osft(config: ModelConfig, data: dict[str, np.ndarray], trigger: tuple[int, ...], *, pad_id: int,
         placement: Placement | None = None, **settings) -> Retune:
    """OSFT: re-tuning on clean examples carrying the known `trigger` (token ids) with their true
    answers."""
    if not trigger:
        raise ConfigError("osft needs the trigger's token ids (a known-trigger defense)")
    return Retune(config, data, pad_id, RetuneSettings(trigger=tuple(int(t) for t in trigger), **settings), placement,
                  name="osft")


def obliviate(config: ModelConfig, data: dict[str, np.ndarray], *, pad_id: int, placement: Placement | None = None,
              **settings) -> Retune:
    """Obliviate: LoRA re-tuning with the paper's defaults λ_amp = 1e-3, λ_attn = 1e-2 unless given."""
    settings = {"amplify": 1e-3, "attention": 1e-2, **settings}
    if settings.get("mode", "lora") != "lora":
        raise ConfigError("obliviate is a PEFT defense: it needs mode='lora'")
    return Retune(config, data, pad_id, RetuneSettings(**settings), placement, name="obliviate")
