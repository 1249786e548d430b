"""The run behind results/defend_mix_search_lora: recipes/defend.py with only its mix_search chain.

    bdjax --config=results/defend_mix_search_lora/recipe.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from defend import get_config as defend  # noqa: E402


def get_config():
    c = defend()
    c.workdir = "runs/defend_mix_search"
    c.defense.export = False
    c.defense.chains = {"mix_search": c.defense.chains["mix_search"]}
    return c
