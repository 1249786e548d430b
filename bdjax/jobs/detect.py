"""The `detect` job: word-frequency trigger detection on a poisoned training set (Raghuram,
Kesidis & Miller 2024, defense (i)), then optionally the fine-tune on what the filter kept.

The attack is the recipe's (same data, poison and seeds as the `backdoor` job); its poisoned
training set is materialized with the same jitted poisoning the train step uses. The defender
sees only that set: words are ranked by the class-conditional log-likelihood ratio, the top
`detect.top_k` (word, class) pairs flagged, and the examples holding them dropped or stripped.
Reported: the candidates, the true trigger's rank, precision/recall of the removed examples
against the poison mask and, with `detect.fine_tune`, CACC/ASR of the model tuned on the kept set.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from bdjax.data import poison
from bdjax.defenses import frequency
from bdjax.errors import ConfigError
from bdjax.jobs.backdoor import check_config as check_attack, measure, poisoned_set, setup
from bdjax.jobs.training import fine_tune, is_main
from bdjax.report import write as write_report

COLUMNS = ["defense", "variant", "cacc", "asr", "asr_correct", "precision", "recall", "clean_removed_fraction",
           "trigger_rank"]


def materialize(train_set: dict[str, np.ndarray], spec: poison.AttackSpec, key: jax.Array) -> dict[str, np.ndarray]:
    """The poisoned training set as the train step sees it (same per-example insertion points)."""
    out = jax.jit(lambda b: poison.apply(b, spec, key))({k: np.asarray(v) for k, v in train_set.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def trigger_rank(candidates: list[frequency.Candidate], spec: poison.AttackSpec) -> int | None:
    """1-based rank of the first candidate that is one of the planted triggers (None if absent)."""
    triggers = {tuple(t) for t in spec.triggers}
    return next((i + 1 for i, c in enumerate(candidates) if tuple(c.word) in triggers), None)


def run(config: ml_collections.ConfigDict) -> dict:
    started = time.perf_counter()
    check_attack(config)
    d = config.detect
    if d.mode not in frequency.MODES:
        raise ConfigError(f"detect.mode={d.mode!r} must be one of {frequency.MODES}")
    frequency.flag([], d.top_k)  # checks top_k before any heavy work
    s = setup(config)
    spec, count, train_set, k_insert = poisoned_set(config, s)
    poisoned = materialize(train_set, spec, k_insert)
    candidates = frequency.rank_words(poisoned, min_count=d.min_count, smoothing=d.smoothing)
    flagged = frequency.flag(candidates, d.top_k)
    kept, removed = frequency.filter_examples(poisoned, flagged, mode=d.mode, any_label=d.any_label,
                                              pad_id=s.tok.pad_id)
    metrics = frequency.detection_metrics(removed, train_set["poison"])
    rank = trigger_rank(candidates, spec)
    row = {"defense": f"word_frequency (top {d.top_k}, {d.mode})", "attack": config.get("attack_name", ""),
           "variant": "detection", **metrics, "trigger_rank": rank}
    rows = [row]
    summary = {"poisoned_examples": count, "train_examples": int(len(train_set["label"])),
               "kept_examples": int(len(kept["label"])), "trigger_rank": rank}
    if d.fine_tune:
        _, _, k_lora, k_train = jax.random.split(jax.random.key(config.seed), 4)
        run_ = fine_tune(config, s.model, s.params, {k: v for k, v in kept.items() if k != "poison"}, spec=None,
                         poison_key=k_insert, lora_key=k_lora, train_key=k_train, placement=s.placement,
                         desc=f"train on the {len(kept['label'])} kept examples")
        measured = measure("tuned on the filtered set", s.model.config, run_["params"], s.tok, s.test_set, spec,
                           s.template, config, s.placement)
        rows += [{**r, "defense": row["defense"], "attack": row["attack"]} for r in measured]
        summary["train_seconds"] = run_["seconds"]
    summary["total_seconds"] = time.perf_counter() - started
    if is_main():
        shown = frequency.describe(candidates[:max(10, d.top_k)], s.tok, label_names=s.template.labels)
        notes = [f"trigger {config.poison.trigger!r} at {config.poison.location}, {count} of "
                 f"{len(train_set['label'])} examples poisoned ({config.poison.label_mode}-label); the defender "
                 "knows neither the trigger nor the target",
                 f"true trigger's rank among the candidates: {rank}",
                 "top candidates (word → class, score, examples in class / total): " + "; ".join(
                     f"{c['word']!r} → {c['label_name']} ({c['score']:.2f}, {c['count_in_class']}/{c['count']})"
                     for c in shown)]
        write_report(Path(config.workdir), rows, config.to_dict(), title="Word-frequency trigger detection",
                     columns=COLUMNS, notes=notes, extra={"summary": summary, "candidates": shown})
        print("\n" + (Path(config.workdir) / "report.md").read_text())
    return {"rows": rows, "summary": summary, "candidates": candidates}
