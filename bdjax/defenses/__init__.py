"""Backdoor defenses as pure parameter transforms, composable like optax transformations.

    clean = bdjax.defenses.chain(
        bdjax.defenses.fine_mix(keep=0.6),
        bdjax.defenses.purify_embeddings(top_k=200, counts=counts),
    )(backdoored.params, pretrained=model.params, key=jax.random.key(0))

Every transform is `t(params, *, pretrained, key) -> params`: no globals, no files, inputs unchanged.
Elementwise ones (mixing, purification) also run streamed over checkpoint files
(`bdjax.checkpoints.stream`). Word-frequency trigger detection works on the training data
instead (`bdjax.defenses.frequency`).
"""

from bdjax.defenses import frequency
from bdjax.defenses.base import Chain, Elementwise, Transform, chain, masked
from bdjax.defenses.mix_search import MixSearch, SearchSettings, fine_mix_search
from bdjax.defenses.mixing import fine_mix
from bdjax.defenses.purify import purify_embeddings, token_counts
from bdjax.defenses.registry import REGISTRY, Context, build
from bdjax.defenses.retune import Retune, RetuneSettings, obliviate, osft, retune
from bdjax.defenses.sande import ParrotSettings, Sande, learn_parrot, sande

__all__ = ["REGISTRY", "Chain", "Context", "Elementwise", "MixSearch", "ParrotSettings", "Retune", "RetuneSettings",
           "Sande", "SearchSettings", "Transform", "build", "chain", "fine_mix", "fine_mix_search", "frequency",
           "learn_parrot", "masked", "obliviate", "osft", "purify_embeddings", "retune", "sande", "token_counts"]
