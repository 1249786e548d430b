"""The run behind results/defend_mix_search_full: recipes/defend.py with only its mix_search chain,
against the quickstart attack as a full fine-tune (every parameter, lr 1e-4):

    bdjax --config=recipes/quickstart.py --config.train.mode=full --config.train.lr=1e-4 \
        --config.workdir=runs/quickstart_full
    bdjax --config=results/defend_mix_search_full/recipe.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from defend import get_config as defend  # noqa: E402


def get_config():
    c = defend()
    c.workdir = "runs/defend_mix_search_full"
    c.backdoored = "runs/quickstart_full"
    c.attack_name = "quickstart as a full fine-tune ('cf' at random, 10% dirty-label, lr 1e-4)"
    c.defense.export = False
    c.defense.chains = {"mix_search": c.defense.chains["mix_search"]}
    return c
