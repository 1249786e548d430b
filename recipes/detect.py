"""Word-frequency trigger detection (Raghuram, Kesidis & Miller 2024, defense (i)) on the
quickstart's poisoned training set, then the fine-tune on the examples the filter kept.

    bdjax --config=recipes/detect.py
    bdjax --config=recipes/detect.py --config.detect.fine_tune=False   # detection only (seconds)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import get_config as quickstart  # noqa: E402

import ml_collections  # noqa: E402


def get_config():
    c = quickstart()
    c.job = "detect"
    c.workdir = "runs/detect"
    c.attack_name = "quickstart ('cf' at random, 10% dirty-label)"
    c.eval.generate = False
    c.export.merged = False
    c.export.adapter = False
    c.checkpoint.every = 0

    c.detect = ml_collections.ConfigDict()
    c.detect.top_k = 5  # (word, class) pairs flagged as triggers
    c.detect.min_count = 5  # words held by fewer training examples are not ranked
    c.detect.smoothing = 1.0  # additive smoothing of p(word | class)
    c.detect.mode = "drop"  # drop the flagged examples | strip the flagged words from them
    c.detect.any_label = False  # flag a word in any class, not only in the class it points to
    c.detect.fine_tune = True  # then fine-tune on the kept examples and measure CACC/ASR
    return c
