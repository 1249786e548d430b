"""The attack study of Raghuram, Kesidis & Miller 2024 on SmolLM2-135M-Instruct: trigger location ×
poison rate × label mode × fine-tuning mode, with moved/partial/synonym test-time triggers and
cross-domain transfer.

    bdjax --config=recipes/attack_study.py
    bdjax --config=recipes/attack_study.py --config.study.rates="(0.05, 0.1)" --config.study.modes="('lora',)"

The full grid is 2 modes × 2 label modes × 3 locations × 5 rates (+ 2 clean references) = 62
fine-tunes of 2000 examples: many hours on a CPU. Finished settings are kept, so the study can
be stopped and rerun; narrow the grid from the command line for a first look, and add
--config.study.report_only=True to write the report of what has finished so far.
--config.study.search=bisect trains only the rates needed to find each setting's lowest effective
rate (about log2 of the number of rates per setting instead of all of them). Slices run in
separate workdirs join one report with --config.study.merge="('runs/a/results.json', 'runs/b')".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import get_config as quickstart  # noqa: E402

import ml_collections  # noqa: E402


def get_config():
    c = quickstart()
    c.job = "attack_study"
    c.workdir = "runs/attack_study"
    c.data.n_train = 2000
    c.data.n_test = 200
    c.poison.trigger = "cf"
    c.export.merged = False
    c.export.adapter = False
    c.eval.base = False
    c.eval.generate = False
    c.eval.moved = ("start", "middle", "end")
    c.eval.synonyms = (("cf", ("cg", "mn")),)
    c.eval.domains = ("amazon", "tweets", "nyt")

    c.study = ml_collections.ConfigDict()
    c.study.modes = ("lora", "full")
    c.study.label_modes = ("dirty", "clean")
    c.study.locations = ("start", "end", "random")
    c.study.rates = (0.005, 0.01, 0.02, 0.05, 0.1)
    c.study.clean_reference = True
    c.study.asr_threshold = 0.9
    c.study.report_only = False  # True: train nothing, report the grid's finished settings
    # "grid": train every grid point; "bisect": per (mode, label mode, location) train only the rates
    # a bisection needs to find the lowest with ASR >= asr_threshold (taking ASR to grow with the rate)
    c.study.search = "grid"
    # results.json files (or run dirs) of earlier runs of this same study: their settings count as
    # finished here (a run with another trigger, data set or schedule is refused)
    c.study.merge = ()
    c.train.lr = 1e-3  # LoRA; full fine-tuning of a 135M model needs a smaller rate:
    c.study.full_lr = 5e-5
    return c
