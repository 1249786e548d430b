"""Clean a generative backdoor (SANDE's setting): defenses against recipes/generative.py's model.

    bdjax --config=recipes/generative.py                  # first: plant the backdoor (runs/generative)
    bdjax --config=recipes/defend_generative.py           # then: defend it

The clean defense and test responses are the pretrained model's own greedy replies; each model is
measured by its marker rate on triggered and clean test prompts and the perplexity of the clean
responses. OSFT knows the trigger; SANDE knows only the backdoor's response (the marker) and
learns a parrot prompt that imitates the trigger. Every hyperparameter is here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defend import RETUNE as CLASSIFICATION_RETUNE  # noqa: E402
from generative import get_config as generative  # noqa: E402

# Overwrite / re-tuning settings shared by the chains: LoRA on all projections over the clean set,
# the loss on each response's first 10 tokens (as SANDE's stage 2).
RETUNE = {**CLASSIFICATION_RETUNE, "answer_tokens": 10}
# SANDE's parrot: 6 soft tokens from zero, lr 1e-3 (the reference code's), at the input's start;
# its loss covers the first tokens of the backdoor's response (the marker).
PARROT = dict(parrot_tokens=6, parrot_lr=1e-3, parrot_epochs=10, parrot_location="start", parrot_answer_tokens=1)


def get_config():
    c = generative()
    c.job = "defend"
    c.workdir = "runs/defend_generative"
    c.backdoored = "runs/generative"  # an HF dir, a .gguf, or a bdjax run dir (final/ or adapter/)
    c.pretrained = "smollm2-135m-instruct"
    c.attack_name = "generative (LoRA, 'cf' at random, marker 'You are stupid!')"
    c.defense.n_clean = 40  # 10% of the attack's 400 training examples
    c.defense.export = False
    c.defense.chains = {
        "osft": ({"name": "osft", "trigger": "cf", **RETUNE},),  # knows the trigger
        "sande": ({"name": "sande", "target": "marked", **PARROT, **RETUNE},),  # knows only the marker
        "retune": ({"name": "retune", **RETUNE},),
    }
    return c
