"""The run behind results/defend_obliviate_attention_lora: Obliviate's attention term swept upward.

    bdjax --config=results/defend_obliviate_attention_lora/recipe.py

recipes/defend.py against the quickstart LoRA backdoor with only Obliviate chains: the paper's
λ_amp 1e-3 with λ_attn raised from its default 1e-2 to 1e-1, 1 and 10, and both terms large.
A landscape measurement: the rows are read off the triggered test set, which a defender cannot do.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from defend import RETUNE, get_config as defend  # noqa: E402


def get_config():
    c = defend()
    c.workdir = "runs/defend_obliviate_attention"
    c.defense.export = False
    c.defense.chains = {
        f"obliviate_attn_{name}": ({"name": "obliviate", **RETUNE, "amplify": 1e-3, "attention": attn},)
        for name, attn in (("1e-1", 1e-1), ("1", 1.0), ("10", 10.0))
    }
    c.defense.chains["obliviate_amp_1e-2_attn_1"] = ({"name": "obliviate", **RETUNE, "amplify": 1e-2, "attention": 1.0},)
    return c
