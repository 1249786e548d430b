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


# Re-tuning settings shared by the chains: LoRA on all projections, 4 epochs over the clean set.
RETUNE = dict(mode="lora", epochs=4, batch_size=8, lr=1e-3, rank=8, alpha=16.0, warmup_steps=0)


def get_config():
    c = quickstart()
    c.job = "defend"
    c.workdir = "runs/defend"
    c.backdoored = "runs/quickstart"  # an HF dir, a .gguf, or a bdjax run dir (final/ or adapter/)
    c.pretrained = "smollm2-135m-instruct"
    c.attack_name = "quickstart (LoRA, 'cf' at random, 10% dirty-label)"
    c.eval.generate = False

    # defense.n_clean / seed / stream / measure_backdoored: see the quickstart's defense section
    c.defense.export = True  # write each cleaned checkpoint to workdir/cleaned/<chain>
    c.defense.chains = {
        "mix_retune": ({"name": "fine_mix", "keep": 0.6, "mode": "selected"}, {"name": "retune", **RETUNE}),
        # ρ chosen on a held-out quarter of the clean set (the largest reset that keeps its accuracy)
        "mix_search": ({"name": "fine_mix_search", "keeps": (0.2, 0.4, 0.6, 0.8), "tolerance": 0.03,
                        "validation": 0.25, **RETUNE},),
        "retune": ({"name": "retune", **RETUNE},),
        "obliviate": ({"name": "obliviate", **RETUNE, "amplify": 1e-3, "attention": 1e-2},),
        "osft": ({"name": "osft", "trigger": "cf", **RETUNE},),  # knows the trigger
    }
    return c
