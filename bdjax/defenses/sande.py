"""SANDE (Li et al. 2024, "Simulate and Eliminate", arXiv 2405.07667): remove a backdoor whose
trigger is unknown but whose triggered response is known (the target class, or a generative
backdoor's marker).

1. **Simulate**: learn a "parrot" soft prompt — `tokens` trainable input embeddings, zero at the
   start, the model frozen — that, inserted into clean inputs, makes the backdoored model give the
   backdoor's response. It is trained exactly like the attack's poisoning, with the parrot's token
   ids as the trigger: inserted (inside the jitted step) into every defense example outside the
   target class, whose answer becomes the target's; the loss covers the answer's first
   `answer_tokens` tokens (the paper trains on the first response token).
2. **Eliminate**: OSFT with the parrot as the trigger: re-tune the model (LoRA or every
   parameter, `bdjax.defenses.retune`) on parrot-carrying clean examples with their true answers,
   the parrot frozen, so the model unlearns "trigger-like input → backdoor response".

Defaults after the reference code (see DESIGN.md): 6 soft tokens, lr 1e-3 for the parrot. The
paper's stage 2 fine-tunes all weights at lr 5e-6 on the first 10 response tokens; the recipe
sets the stage-2 settings (as for `osft`). Deterministic given the key, hence a pure transform.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import loop, train
from bdjax.data import poison
from bdjax.data.tokenize import subset
from bdjax.defenses.retune import Retune, RetuneSettings, fit_with_progress
from bdjax.errors import ConfigError
from bdjax.models.config import ModelConfig
from bdjax.models.llama import SOFT_PROMPT, soft_token_ids
from bdjax.sharding import Placement

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParrotSettings:
    """Stage 1: the parrot prompt and how it is learned."""

    tokens: int = 6
    location: str = "start"  # where it goes in the input text (poison.LOCATIONS)
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    answer_tokens: int = 1  # the loss covers the target answer's first this many tokens (0: all)
    remat: str = "dots"

    def __post_init__(self):
        if self.tokens < 1:
            raise ConfigError(f"sande parrot_tokens={self.tokens} must be at least 1")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"sande parrot_epochs={self.epochs}, parrot_batch_size={self.batch_size} and "
                              f"parrot_lr={self.lr} must be positive")
        if self.answer_tokens < 0:
            raise ConfigError(f"sande parrot_answer_tokens={self.answer_tokens} must be >= 0 (0: the whole answer)")
        poison.check_settings(self.location, "dirty")


def learn_parrot(config: ModelConfig, params: Params, data: dict[str, np.ndarray], *, target: int, pad_id: int,
                 settings: ParrotSettings, key: jax.Array, placement: Placement | None = None,
                 desc: str = "sande parrot") -> dict:
    """The parrot soft prompt [tokens, hidden] that makes the frozen model (`params`) answer
    `target` on the non-target examples of `data`; with its training log."""
    s = settings
    placement = placement or Placement.create()
    placement.check_batch(s.batch_size)
    others = np.flatnonzero(np.asarray(data["label"]) != target)
    if len(others) == 0:
        raise ConfigError("sande learns its parrot on defense examples outside the target class, and there are none")
    pieces = {**subset(data, others), "poison": np.ones(len(others), bool)}
    ids = soft_token_ids(config, s.tokens)
    spec = poison.AttackSpec(ids, int(target), s.location, "dirty")
    steps = s.epochs * loop.steps_per_epoch(len(others), s.batch_size)
    optimizer = train.make_optimizer(lr=s.lr, total_steps=steps, schedule="constant", max_grad_norm=None)
    k_insert, k_train, k_order = jax.random.split(key, 3)
    soft = {SOFT_PROMPT: jnp.zeros((s.tokens, config.hidden_size), jnp.float32)}
    frozen = {k: v for k, v in params.items() if k != SOFT_PROMPT}
    frozen = train.place_params(placement, config, frozen)
    step_fn = train.make_train_step(config, optimizer, pad_id=pad_id, spec=spec, poison_key=k_insert, alpha=1.0,
                                    remat=s.remat, placement=placement, trainable=soft, params=frozen, full=True,
                                    answer_tokens=s.answer_tokens)
    state, log = fit_with_progress(step_fn, step_fn.init_state(soft, k_train), frozen, pieces,
                                   batch_size=s.batch_size, epochs=s.epochs, order_key=k_order, steps=steps,
                                   extra_tokens=spec.n_tokens, desc=desc)
    return {"prompt": state.trainable[SOFT_PROMPT], "ids": ids, "log": log}


@dataclasses.dataclass(frozen=True, eq=False)
class Sande:
    """`t(params, *, pretrained, key) -> params`: learn a parrot for `target`, then overwrite."""

    config: ModelConfig
    data: dict[str, np.ndarray]
    pad_id: int
    target: int
    parrot: ParrotSettings
    overwrite: RetuneSettings
    placement: Placement | None = None
    name: str = "sande"

    def __call__(self, params: Params, *, pretrained: Params, key: jax.Array) -> Params:
        return self.run(params, pretrained=pretrained, key=key)["params"]

    def run(self, params: Params, *, pretrained: Params, key: jax.Array) -> dict:
        """The cleaned params, the parrot prompt and both stages' logs."""
        k_parrot, k_overwrite = jax.random.split(key)
        parrot = learn_parrot(self.config, params, self.data, target=self.target, pad_id=self.pad_id,
                              settings=self.parrot, key=k_parrot, placement=self.placement,
                              desc=f"{self.name} parrot")
        settings = dataclasses.replace(self.overwrite, trigger=parrot["ids"])
        with_parrot = {**params, SOFT_PROMPT: parrot["prompt"]}
        out = Retune(self.config, self.data, self.pad_id, settings, self.placement, name=f"{self.name} overwrite").run(
            with_parrot, pretrained=pretrained, key=k_overwrite)
        return {**out, "parrot": parrot["prompt"], "parrot_log": parrot["log"]}


def sande(config: ModelConfig, data: dict[str, np.ndarray], target: int, *, pad_id: int,
          placement: Placement | None = None, parrot: ParrotSettings | None = None, **settings) -> Sande:
    """SANDE against a backdoor whose response is class `target` of `data`'s answers; `settings`
    are the overwrite stage's (`RetuneSettings`, without a trigger: the parrot is one)."""
    if "trigger" in settings:
        raise ConfigError("sande learns its own trigger (the parrot); use osft for a known trigger")
    answers = np.asarray(data["response_len"]).shape[1]
    if not 0 <= int(target) < answers:
        raise ConfigError(f"sande target class {target} is not one of the data's {answers} answers")
    return Sande(config, data, pad_id, int(target), parrot or ParrotSettings(), RetuneSettings(**settings), placement)
