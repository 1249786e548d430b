"""Loss terms added to fine-tuning by the re-tuning defenses (see `bdjax.defenses.retune`).

- `l2`: λ·Σ‖θ_eff − θ_pre‖², pulling the tuned weights back toward the pretrained ones. In full
  fine-tuning θ_eff is every parameter; under LoRA it is each targeted kernel with its LoRA
  update folded in, written against an anchor tree that holds θ_pre − θ_base per kernel.
- `amplify` (Obliviate, Kim et al. 2024, arXiv 2409.14119, Eq. 3): −λ_amp·Σ‖θ_lora‖₂, one norm per
  LoRA matrix and layer — growing the benign PEFT update drowns the backdoor's.
- `attention` (Obliviate, Eq. 4): +λ_attn·mean‖A_s‖₂, the L2 norm of the post-softmax attention row
  of the summarizing position s (here the last prompt token, which predicts the answer), averaged
  over heads, layers and examples. A trigger captures attention (a peaked row, norm near 1); the
  term spreads it out. It needs attention probabilities, which the model sows only when asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bdjax import lora as lora_lib
from bdjax.errors import ConfigError

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Regularizer:
    l2: float = 0.0
    amplify: float = 0.0
    attention: float = 0.0

    def __post_init__(self):
        for name in ("l2", "amplify", "attention"):
            if getattr(self, name) < 0:
                raise ConfigError(f"regularizer {name}={getattr(self, name)} must be >= 0")

    @property
    def active(self) -> bool:
        return bool(self.l2 or self.amplify or self.attention)


def anchor_tree(pretrained: Params, base: Params, lora: Params | None) -> Params:
    """What the L2 term compares against: the pretrained params (full fine-tuning), or for each
    LoRA-targeted kernel θ_pre − θ_base (so that ‖θ_base + ΔW − θ_pre‖ = ‖ΔW − anchor‖)."""
    if lora is None:
        return pretrained
    out: Params = {}
    for path in lora_lib.lora_paths(lora):
        lora_lib.set_path(out, path, lora_lib.get_path(pretrained, path + "/kernel") - lora_lib.get_path(base, path + "/kernel"))
    return out


def _sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x.astype(jnp.float32)))


def param_penalty(reg: Regularizer, trainable: Params, anchor: Params, *, full: bool, alpha: float) -> jax.Array:
    """The terms that depend on the parameters alone (L2 and LoRA-norm amplification)."""
    total = jnp.zeros((), jnp.float32)
    if reg.l2:
        if full:
            total += reg.l2 * sum(_sq(t - a) for t, a in zip(jax.tree.leaves(trainable), jax.tree.leaves(anchor)))
        else:
            for path in lora_lib.lora_paths(trainable):
                node, layered = lora_lib.get_path(trainable, path), path.startswith("layers/")
                scale = alpha / node["b"].shape[1 if layered else 0]
                d = scale * lora_lib.delta(node["a"].astype(jnp.float32), node["b"].astype(jnp.float32), layered)
                total += reg.l2 * _sq(d - lora_lib.get_path(anchor, path))
    if reg.amplify:
        if full:
            raise ConfigError("the amplify (Obliviate) regularizer needs LoRA re-tuning (train.mode='lora')")
        norms = []
        for path in lora_lib.lora_paths(trainable):
            for m in lora_lib.get_path(trainable, path).values():
                flat = m.reshape(m.shape[0], -1) if path.startswith("layers/") else m.reshape(1, -1)
                # safe: B starts at zero, where the norm has no gradient
                norms.append(optax.safe_norm(flat.astype(jnp.float32), 1e-12, axis=1).sum())
        total -= reg.amplify * sum(norms)
    return total
