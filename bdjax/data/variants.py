"""Test-time trigger variants (Raghuram et al. 2024): does the backdoor fire when the trigger is
moved, shortened, or replaced by a synonym?

Each variant is an `AttackSpec` for evaluation only: `moved` keeps the trigger and changes its
location; `partial` keeps a proper, order-preserving subset of a phrase's words; `synonym`
replaces one trigger word by an entry of the recipe's synonym table.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

from bdjax.data.poison import LOCATIONS, AttackSpec
from bdjax.data.tokenize import trigger_ids
from bdjax.errors import ConfigError

MAX_PARTIAL_WORDS = 4  # phrases longer than this get only the drop-one-word subsets


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str  # moved | partial | synonym
    detail: str  # the new location or trigger text
    spec: AttackSpec


def _partials(words: list[str]) -> list[list[str]]:
    n = len(words)
    if n < 2:
        return []
    sizes = range(1, n) if n <= MAX_PARTIAL_WORDS else [n - 1]
    return [[words[i] for i in keep] for size in sizes for keep in itertools.combinations(range(n), size)]


def trigger_variants(spec: AttackSpec, trigger: str, tokenizer, *, moved: Sequence[str] = (),
                       partial: bool = False, synonyms: Mapping[str, Sequence[str]] | None = None) -> list[Variant]:
    """The variants of the (first) trigger `trigger` (its text) that the recipe asks for."""
    ids = lambda text: tuple(int(i) for i in trigger_ids(tokenizer, text))
    out = []
    for location in moved:
        if location not in LOCATIONS:
            raise ConfigError(f"eval.moved location {location!r} must be one of {LOCATIONS}")
        if location != spec.location:
            out.append(Variant("moved", location, dataclasses.replace(spec, location=location)))
    words = trigger.split()
    if partial:
        for sub in _partials(words):
            text = " ".join(sub)
            out.append(Variant("partial", text, dataclasses.replace(spec, trigger=ids(text))))
    for word, alternatives in (synonyms or {}).items():
        if word not in words:
            raise ConfigError(f"eval.synonyms names {word!r}, which is not a word of the trigger {trigger!r}")
        for alt in alternatives:
            text = " ".join(alt if w == word else w for w in words)
            out.append(Variant("synonym", text, dataclasses.replace(spec, trigger=ids(text))))
    return out
