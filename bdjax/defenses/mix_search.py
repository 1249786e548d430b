"""Fine-mixing with its keep ratio ρ chosen on clean data, as a defender can choose it.

Fine-mixing (`bdjax.defenses.mixing`) trades backdoor removal for clean accuracy through ρ, and a
table of fixed ρ read off the test set's ASR uses what a defender does not know (the trigger).
This search uses only the clean defense set, as Zhang et al. 2022 pick ρ on clean validation data:
it holds out a `validation` fraction of it, and for each candidate in `keeps`, from the largest
reset (smallest ρ) up, mixes, re-tunes on the rest and measures clean accuracy on the held-out
examples. The first ρ whose accuracy is at least the backdoored model's own on the same examples
minus `tolerance` wins: the largest reset that keeps clean accuracy. When none does, the largest ρ
is taken. With `refit`, the winner's mix is then re-tuned on the whole defense set, so the result
has seen as much clean data as a fixed-ρ chain's.

Every candidate uses the same mixing key (with random masks, a larger ρ keeps a superset of a
smaller one's entries) and the same re-tuning key (LoRA init, data order), so candidates differ
only in ρ. The transform is a pure function of its inputs; `report`, when given, receives the
search's trials as text (for a job's report).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bdjax import evaluate, train
from bdjax.data.tokenize import subset
from bdjax.defenses.mixing import MODES, SCOPES, fine_mix
from bdjax.defenses.retune import Retune, RetuneSettings
from bdjax.errors import ConfigError
from bdjax.models.config import ModelConfig
from bdjax.sharding import Placement

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    keeps: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # candidate ρ, tried from the smallest up
    tolerance: float = 0.03  # accepted drop of held-out clean accuracy below the backdoored model's
    validation: float = 0.25  # fraction of the defense set held out to measure clean accuracy
    refit: bool = True  # re-tune the chosen mix on the whole defense set
    mix_mode: str = "selected"
    mix_scope: str = "tensor"
    mix_embeddings: bool = True

    def __post_init__(self):
        keeps = tuple(float(k) for k in self.keeps)
        if not keeps or any(not 0.0 <= k <= 1.0 for k in keeps):
            raise ConfigError(f"fine_mix_search keeps={self.keeps} must be one or more ratios in [0, 1]")
        object.__setattr__(self, "keeps", tuple(sorted(set(keeps))))
        if not 0.0 < self.validation < 1.0:
            raise ConfigError(f"fine_mix_search validation={self.validation} must be in (0, 1): the held-out "
                              "fraction of the defense set")
        if self.tolerance < 0:
            raise ConfigError(f"fine_mix_search tolerance={self.tolerance} must be >= 0")
        if self.mix_mode not in MODES or self.mix_scope not in SCOPES:
            raise ConfigError(f"fine_mix_search mix_mode={self.mix_mode!r} / mix_scope={self.mix_scope!r} must be "
                              f"one of {MODES} / {SCOPES}")


def split(n: int, validation: float, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(tuning indices, held-out indices): a random `validation` fraction held out, at least one
    example on each side."""
    held = min(max(1, round(validation * n)), n - 1)
    order = np.asarray(jax.random.permutation(key, n))
    return np.sort(order[held:]), np.sort(order[:held])


@dataclasses.dataclass(frozen=True, eq=False)
class MixSearch:
    """`t(params, *, pretrained, key) -> params`: Fine-mixing + re-tuning with ρ searched on
    held-out clean examples (see the module docstring)."""

    config: ModelConfig
    data: dict[str, np.ndarray]
    pad_id: int
    search: SearchSettings
    retune: RetuneSettings
    placement: Placement | None = None
    report: Callable[[str], None] | None = None
    name: str = "fine_mix_search"

    def __call__(self, params: Params, *, pretrained: Params, key: jax.Array) -> Params:
        return self.run(params, pretrained=pretrained, key=key)["params"]

    def accuracy(self, params: Params, pieces: dict[str, np.ndarray]) -> float:
        placement = self.placement or Placement.create()
        ll = evaluate.score(self.config, train.place_params(placement, self.config, params), pieces, pad_id=self.pad_id, placement=placement)
        return float((ll.argmax(1) == pieces["label"]).mean())

    def run(self, params: Params, *, pretrained: Params, key: jax.Array) -> dict:
        """The cleaned params, the chosen ρ, and every trial's held-out accuracy."""
        s = self.search
        k_split, k_mix, k_tune = jax.random.split(key, 3)
        tune_idx, held_idx = split(len(self.data["label"]), s.validation, k_split)
        tune_set, held = subset(self.data, tune_idx), subset(self.data, held_idx)
        reference = self.accuracy(params, held)
        need = reference - s.tolerance
        mix = lambda keep: fine_mix(keep, mode=s.mix_mode, scope=s.mix_scope, embeddings=s.mix_embeddings)(
            params, pretrained=pretrained, key=k_mix)
        trials, chosen = [], None
        for keep in s.keeps:
            mixed = mix(keep)
            tuned = Retune(self.config, tune_set, self.pad_id, self.retune, self.placement,
                           name=f"{self.name} keep={keep:g}")(mixed, pretrained=pretrained, key=k_tune)
            acc = self.accuracy(tuned, held)
            trials.append({"keep": keep, "held_out_accuracy": acc})
            if acc >= need - 1e-9:
                chosen = (keep, mixed, tuned)
                break
        if chosen is None:  # nothing kept clean accuracy: the smallest reset tried
            chosen = (s.keeps[-1], mixed, tuned)
        keep, mixed, tuned = chosen
        if s.refit:
            tuned = Retune(self.config, self.data, self.pad_id, self.retune, self.placement,
                           name=f"{self.name} refit keep={keep:g}")(mixed, pretrained=pretrained, key=k_tune)
        if self.report is not None:
            tried = ", ".join(f"ρ={t['keep']:g}: {t['held_out_accuracy']:.3f}" for t in trials)
            passed = any(t["held_out_accuracy"] >= need - 1e-9 for t in trials)
            self.report(f"{self.name}: held-out clean accuracy on {len(held_idx)} of {len(self.data['label'])} "
                        f"defense examples, backdoored {reference:.3f}, needed >= {need:.3f}; tried {tried}; chose "
                        f"ρ={keep:g}" + ("" if passed else " (none passed: the largest ρ)")
                        + (", re-tuned on the whole set" if s.refit else ""))
        return {"params": tuned, "keep": keep, "trials": trials, "reference_accuracy": reference,
                "held_out": held_idx}


def fine_mix_search(config: ModelConfig, data: dict[str, np.ndarray], *, pad_id: int,
                    placement: Placement | None = None, report: Callable[[str], None] | None = None,
                    keeps=SearchSettings.keeps, tolerance: float = SearchSettings.tolerance,
                    validation: float = SearchSettings.validation, refit: bool = SearchSettings.refit,
                    mix_mode: str = SearchSettings.mix_mode, mix_scope: str = SearchSettings.mix_scope,
                    mix_embeddings: bool = SearchSettings.mix_embeddings, **retune) -> MixSearch:
    """Fine-mixing with ρ searched on held-out clean examples of `data` (a classification set);
    `retune` are the re-tuning settings (`RetuneSettings`, without a trigger)."""
    if "trigger" in retune:
        raise ConfigError("fine_mix_search does not know the trigger; use osft for a known one")
    labels = np.asarray(data["label"])
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        raise ConfigError("fine_mix_search measures clean accuracy on held-out examples and needs a defense set "
                          f"with at least two answer classes ({len(labels)} examples, "
                          f"{len(np.unique(labels))} class(es) here)")
    search = SearchSettings(tuple(keeps), tolerance, validation, refit, mix_mode, mix_scope, mix_embeddings)
    return MixSearch(config, data, pad_id, search, RetuneSettings(**retune), placement, report)
