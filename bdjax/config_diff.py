"""Which settings two recipe configs differ in, allowing for keys added to bdjax since one ran.

Used wherever a config saved by an earlier run is compared with the current one: merging an
attack study's results, and resuming a training run from its checkpoints.
"""

from __future__ import annotations

import json

# Config keys added since earlier runs were made, with the value that does what those runs did
# (None: every value does; the key changes only speed or bookkeeping). A saved config lacks
# them; it matches only while the current one holds that value. A key only one side has and
# not listed here counts as a difference: add it here, with its old behaviour, when adding it
# to the recipes.
ADDED_KEYS: dict[str, object] = {
    "train.share_prefix": None,  # the template prefix run once per batch: the same sums, reordered
    "train.bucket": None,  # row widths: padding only
    "train.width_compile_cost": None,  # which widths are compiled: padding only
    "train.matmul_dtype": "",  # "" = products in the compute dtype, as before the option existed
    "train.attention": None,  # fused CPU attention kernel or XLA's ops: the same math, float rounding apart
    "study.search": None,  # which of an attack study's grid points are trained, never how
}


def flat(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differences(ours: dict, theirs: dict, ignore=()) -> list[str]:
    """Sorted dotted keys on which two nested configs differ, leaving out `ignore`. A key only one
    side has differs unless `ADDED_KEYS` names it with a value that side holds (or None). Values
    compare as JSON (tuples and lists alike)."""
    a, b = (flat(json.loads(json.dumps(d, default=str))) for d in (ours, theirs))
    skip = set(ignore)
    out = [k for k in a.keys() & b.keys() if k not in skip and a[k] != b[k]]
    for side, other in ((a, b), (b, a)):
        for k in side.keys() - other.keys() - skip:
            if k not in ADDED_KEYS or ADDED_KEYS[k] not in (None, side[k]):
                out.append(k)
    return sorted(out)
