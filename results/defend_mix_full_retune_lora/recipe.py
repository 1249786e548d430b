"""The run behind results/defend_mix_full_retune_lora: Fine-mixing followed by re-tuning the whole
model, as Zhang et al. 2022 re-tune, against the quickstart LoRA backdoor.

    bdjax --config=results/defend_mix_full_retune_lora/recipe.py

recipes/defend.py's mixing chains with the re-tuning switched from a fresh LoRA to full
fine-tuning of every parameter (lr 5e-5, the attack study's full fine-tuning rate; 4 epochs over
the 100 clean examples): the fixed ρ = 0.6 chain, and ρ searched on held-out clean data.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from defend import RETUNE, get_config as defend  # noqa: E402

FULL_RETUNE = {**RETUNE, "mode": "full", "lr": 5e-5}


def get_config():
    c = defend()
    c.workdir = "runs/defend_mix_full_retune"
    c.defense.export = False
    c.defense.chains = {
        "mix_full_retune": ({"name": "fine_mix", "keep": 0.6, "mode": "selected"}, {"name": "retune", **FULL_RETUNE}),
        "mix_search_full_retune": ({"name": "fine_mix_search", "keeps": (0.2, 0.4, 0.6, 0.8), "tolerance": 0.03,
                                    "validation": 0.25, **FULL_RETUNE},),
    }
    return c
