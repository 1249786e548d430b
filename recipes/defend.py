"""Clean a backdoored checkpoint: defense chains against the quickstart's backdoor.

    bdjax --config=recipes/quickstart.py                  # first: plant the backdoor (runs/quickstart)
    bdjax --config=recipes/defend.py                      # then: defend it
    bdjax --config=recipes/defend.py --config.backdoored=/path/to/hf_dir --config.pretrained=/path/to/base

The template, data split and trigger come from the quickstart recipe (the trigger only to measure
ASR: no defense sees it). Each chain is a tuple of registry entries (bdjax.defenses.REGISTRY);
every hyperparameter is here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import get_config as quickstart  # noqa: E402

import ml_collections  # noqa: E402

# Re-tuning settings shared by the chains: LoRA on all projections, 2 epochs over the clean set.
RETUNE = dict(mode="lora", epochs=2, batch_size=8, lr=5e-4, rank=8, alpha=16.0, warmup_steps=0)


def get_config():
    c = quickstart()
    c.job = "defend"
    c.workdir = "runs/defend"
    c.backdoored = "runs/quickstart"  # an HF dir, a .gguf, or a bdjax run dir (final/ or adapter/)
    c.pretrained = "smollm2-135m-instruct"
    c.attack_name = "quickstart (LoRA, 'cf' at random, 10% dirty-label)"
    c.eval.generate = False

    c.defense = ml_collections.ConfigDict()
    c.defense.n_clean = 100  # clean defense examples: 10% of the attack's 1000 training examples
    c.defense.seed = 0  # which of the unused training-pool examples form the defense set
    c.defense.export = True  # write each cleaned checkpoint to workdir/cleaned/<chain>
    c.defense.stream = True  # elementwise-only chains run tensor by tensor over the files
    c.defense.chains = {
        "fine_mix": ({"name": "fine_mix", "keep": 0.4, "mode": "selected"}, {"name": "retune", **RETUNE}),
        "retune": ({"name": "retune", **RETUNE},),
        "obliviate": ({"name": "obliviate", **RETUNE, "amplify": 1e-3, "attention": 1e-2},),
    }
    return c
