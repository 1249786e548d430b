"""The defense study on SmolLM2-135M-Instruct: a LoRA and a full fine-tuning rare-word backdoor
(the quickstart's attack) and a generative backdoor (recipes/generative.py), each attacked by every
defense chain that applies; word-frequency detection on each poisoned classification training set.

    bdjax --config=recipes/defense_study.py

Attacks are trained into runs/defense_study/attacks/<name> once (reruns reuse them).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defend import RETUNE, get_config as defend  # noqa: E402
from defend_generative import PARROT, RETUNE as GEN_RETUNE  # noqa: E402
from generative import get_config as generative  # noqa: E402

import ml_collections  # noqa: E402


def get_config():
    c = defend()
    c.job = "defense_study"
    c.workdir = "runs/defense_study"
    c.defense.export = False  # the study keeps the numbers, not every cleaned checkpoint
    c.checkpoint.every = 0

    c.study = ml_collections.ConfigDict()
    # name -> ((dotted recipe key, value), ...) applied to the quickstart attack
    c.study.attacks = {
        "lora": (("train.mode", "lora"),),
        "full": (("train.mode", "full"), ("train.lr", 1e-4)),  # every parameter, embeddings included
        "generative": (("recipe", "generative"),),  # the marker backdoor, from study.recipes
    }
    gen = generative()
    gen.defense.n_clean = 40  # 10% of its 400 training examples
    c.study.recipes = {"generative": gen}
    c.defense.chains = {
        "mix_retune": ({"name": "fine_mix", "keep": 0.6, "mode": "selected"}, {"name": "retune", **RETUNE}),
        "mix_search": ({"name": "fine_mix_search", "keeps": (0.2, 0.4, 0.6, 0.8), "tolerance": 0.03,
                        "validation": 0.25, **RETUNE},),  # ρ chosen on held-out clean examples
        "epur": ({"name": "purify_embeddings", "top_k": 200, "floor": 20.0},),
        "epur_retune": ({"name": "purify_embeddings", "top_k": 200, "floor": 20.0}, {"name": "retune", **RETUNE}),
        "retune": ({"name": "retune", **RETUNE},),
        "obliviate": ({"name": "obliviate", **RETUNE, "amplify": 1e-3, "attention": 1e-2},),
        "osft": ({"name": "osft", "trigger": "cf", **RETUNE},),
        "sande": ({"name": "sande", "target": "positive", **PARROT, **RETUNE},),  # knows the target, not the trigger
        "osft_marker": ({"name": "osft", "trigger": "cf", **GEN_RETUNE},),
        "sande_marker": ({"name": "sande", "target": "marked", **PARROT, **GEN_RETUNE},),
    }
    # E-PUR needs an attack that moved the embeddings; the *_marker chains are the generative ones
    classification = ("lora", "full")
    c.study.only = {"epur": ("full",), "epur_retune": ("full",), "mix_retune": classification,
                    "mix_search": classification,
                    "obliviate": classification, "osft": classification, "sande": classification,
                    "osft_marker": ("generative",), "sande_marker": ("generative",)}
    c.study.detect = True
    c.study.detect_settings = ml_collections.ConfigDict(
        {"top_k": 5, "min_count": 5, "smoothing": 1.0, "mode": "drop", "any_label": False, "fine_tune": False})
    return c
