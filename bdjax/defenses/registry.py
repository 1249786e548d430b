"""Defense chains from recipe entries: `({"name": "fine_mix", "keep": 0.6}, {"name": "retune"}, ...)`.

Transforms that need more than the two checkpoints (the clean defense set, token counts, the
model config) get them from a `Context` the job builds; the recipe holds every hyperparameter.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bdjax.defenses.base import Chain, Transform, chain, masked
from bdjax.defenses.mix_search import SearchSettings, fine_mix_search
from bdjax.defenses.mixing import fine_mix
from bdjax.defenses.purify import purify_embeddings, token_counts
from bdjax.defenses.retune import RetuneSettings, obliviate, osft, retune
from bdjax.defenses.sande import ParrotSettings, sande
from bdjax.errors import ConfigError
from bdjax.models.config import ModelConfig
from bdjax.sharding import Placement


@dataclasses.dataclass
class Context:
    """What a defense may use besides the checkpoints: the clean defense set and the model."""

    config: ModelConfig
    data: dict[str, np.ndarray]
    pad_id: int
    placement: Placement | None = None
    tokenizer: Any = None  # for defenses given text (a known trigger)
    labels: tuple[str, ...] = ()  # the answers' names, for defenses given a target answer by name
    notes: list[str] = dataclasses.field(default_factory=list)  # what defenses found, for the job's report

    @functools.cached_property
    def counts(self) -> np.ndarray:
        return token_counts(self.data, self.config.vocab_size)


def _mix(ctx: Context, **kw) -> Transform:
    return fine_mix(**kw)


def _purify(ctx: Context, **kw) -> Transform:
    return purify_embeddings(counts=ctx.counts, **kw)


def _mix_search(ctx: Context, **kw) -> Transform:
    return fine_mix_search(ctx.config, ctx.data, pad_id=ctx.pad_id, placement=ctx.placement, report=ctx.notes.append,
                           **kw)


def _retune(ctx: Context, **kw) -> Transform:
    return retune(ctx.config, ctx.data, pad_id=ctx.pad_id, placement=ctx.placement, **kw)


def _osft(ctx: Context, *, trigger: str, **kw) -> Transform:
    from bdjax.data.tokenize import trigger_ids

    if ctx.tokenizer is None:
        raise ConfigError("osft takes its trigger as text and needs the model's tokenizer")
    return osft(ctx.config, ctx.data, tuple(int(i) for i in trigger_ids(ctx.tokenizer, trigger)), pad_id=ctx.pad_id,
                placement=ctx.placement, **kw)


def _sande(ctx: Context, *, target: str, **kw) -> Transform:
    if target not in ctx.labels:
        raise ConfigError(f"sande target {target!r} is not one of the answers {list(ctx.labels)}")
    parrot = {k.removeprefix("parrot_"): kw.pop(k) for k in list(kw) if k.startswith("parrot_")}
    return sande(ctx.config, ctx.data, ctx.labels.index(target), pad_id=ctx.pad_id, placement=ctx.placement,
                 parrot=ParrotSettings(**parrot), **kw)


def _obliviate(ctx: Context, **kw) -> Transform:
    return obliviate(ctx.config, ctx.data, pad_id=ctx.pad_id, placement=ctx.placement, **kw)


def _names(fn: Callable) -> set[str]:
    params = inspect.signature(fn).parameters
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


_RETUNE = {f.name for f in dataclasses.fields(RetuneSettings)} - {"trigger", "trigger_location", "trigger_fraction"}
# name -> (constructor from the context and settings, the settings a recipe may give)
REGISTRY: dict[str, tuple[Callable[..., Transform], set[str]]] = {
    "fine_mix": (_mix, _names(fine_mix)),
    "fine_mix_search": (_mix_search, _RETUNE | {f.name for f in dataclasses.fields(SearchSettings)}),
    "purify_embeddings": (_purify, _names(purify_embeddings) - {"counts"}),
    "retune": (_retune, _RETUNE),
    "obliviate": (_obliviate, _RETUNE),
    "osft": (_osft, _RETUNE | {"trigger", "trigger_location", "trigger_fraction"}),
    "sande": (_sande, _RETUNE | {"target", "trigger_location", "trigger_fraction"}
              | {f"parrot_{f.name}" for f in dataclasses.fields(ParrotSettings)}),
}


def _split(entry: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kw = dict(entry)
    name = kw.pop("name", None)
    if name not in REGISTRY:
        raise ConfigError(f"defense {name!r} is not in the registry; choose one of {sorted(REGISTRY)}")
    paths = {k: kw.pop(k) for k in ("include", "exclude") if k in kw}
    allowed = REGISTRY[name][1]
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ConfigError(f"defense {name!r} has no setting(s) {unknown}; it takes {sorted(allowed)}")
    return name, kw, paths


def validate(entries: Sequence[dict[str, Any]]) -> None:
    """Names and setting names of a chain, checked before any heavy work."""
    if not entries:
        raise ConfigError("the defense chain is empty: give at least one entry like {'name': 'fine_mix', 'keep': 0.6}")
    for entry in entries:
        _split(entry)


def build(entries: Sequence[dict[str, Any]], ctx: Context) -> Chain:
    """A chain from recipe entries; each may add `include`/`exclude` path regexes (see `masked`)."""
    validate(entries)
    out = []
    for entry in entries:
        name, kw, paths = _split(entry)
        t = REGISTRY[name][0](ctx, **kw)
        out.append(masked(t, **paths) if paths else t)
    return chain(*out)


def describe(entries: Sequence[dict[str, Any]]) -> str:
    """A short human name of a chain, e.g. "fine_mix(keep=0.6) + retune"."""
    parts = []
    for e in entries:
        kw = ", ".join(f"{k}={v}" for k, v in e.items() if k != "name")
        parts.append(f"{e['name']}({kw})" if kw else e["name"])
    return " + ".join(parts)
