"""The `defense_study` job: every defense chain against every attack of the study, one table.

For each attack in `study.attacks` ({name: ((dotted recipe key, value), ...)}, applied to this recipe's
backdoor settings) the backdoored model is trained into `workdir/attacks/<name>` (kept and resumed:
a finished attack is not retrained), then the `defense.chains` that apply to it
(`study.only[chain]` lists the attacks a chain is meant for, e.g. E-PUR needs a full fine-tune)
run through the `defend` job into `workdir/defended/<name>`, and word-frequency detection through
the `detect` job. Rows: `defense`, `attack`, `cacc`, `asr` (+ detection precision/recall);
`report.md` and `asr_vs_cacc.png` (the pretrained and backdoored models as reference points).

An attack whose overrides start with `("recipe", name)` is built from `study.recipes[name]` (a
whole recipe, e.g. the generative backdoor's) instead of this one, with this recipe's `defense`
section; a generative backdoor (`poison.marker`) is trained by the `generative` job, its rows
carry `marker_rate`, `marker_rate_clean` and `ppl`, it gets `marker_vs_ppl.png`, and word-frequency
detection (a classification statistic) is not run on it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ml_collections

from bdjax import plots
from bdjax.errors import ConfigError
from bdjax.jobs import backdoor, defend, detect
from bdjax.jobs import generative as generative_job
from bdjax.jobs.training import is_main
from bdjax.report import write as write_report

COLUMNS = ["attack", "defense", "cacc", "asr", "asr_correct", "marker_rate", "marker_rate_clean", "ppl", "precision",
           "recall", "clean_removed_fraction", "trigger_rank", "seconds"]


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any], **top) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted keys set (e.g. {"train.mode": "full"}) and top-level `top`."""
    out = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in {**overrides, **top}.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            if p not in node:
                raise ConfigError(f"study override {dotted!r}: the recipe has no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"study override {dotted!r}: the recipe has no key {leaf!r} there")
        node[leaf] = value
    return out


def _main_rows(rows: list[dict], source: str) -> list[dict]:
    """The rows of the trigger as planted on the training domain (generative rows are all such)."""
    return [r for r in rows if "marker_rate" in r or (r.get("variant") == "clean" and r.get("domain") == source)]


def attack_base(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The recipe an attack starts from: `study.recipes[overrides["recipe"]]` with this recipe's
    defense section and model pair, or this recipe itself."""
    name = overrides.get("recipe")
    if name is None:
        return config
    recipes = dict(config.study.get("recipes", {}))
    if name not in recipes:
        raise ConfigError(f"study attack recipe {name!r} is not in study.recipes {sorted(recipes)}")
    base = ml_collections.ConfigDict(recipes[name].to_dict())
    base.defense = ml_collections.ConfigDict({**config.defense.to_dict(), **base.get("defense", {}).to_dict()})
    base.defense.chains = config.defense.chains
    for key in ("pretrained", "backdoored", "attack_name", "model", "seed", "dtype", "mesh"):
        if key in config:
            base[key] = config[key]
    return base


def run(config: ml_collections.ConfigDict) -> dict:
    started = time.perf_counter()
    defend.check_config(config)
    attacks = {name: dict(o) for name, o in dict(config.study.attacks).items()}
    only = {k: tuple(v) for k, v in dict(config.study.get("only", {})).items()}
    unknown = sorted(set(only) - set(dict(config.defense.chains)))
    if unknown:
        raise ConfigError(f"study.only names chains {unknown} that are not in defense.chains")
    out = Path(config.workdir)
    rows: list[dict] = []
    bases = {name: attack_base(config, overrides) for name, overrides in attacks.items()}  # errors first
    for i, (name, overrides) in enumerate(attacks.items()):
        base = bases[name]
        generative = bool(base.poison.get("marker", ""))
        settings = {k: v for k, v in overrides.items() if k != "recipe"}
        attack_dir = out / "attacks" / name
        attack_cfg = with_overrides(base, settings, job="generative" if generative else "backdoor",
                                    workdir=str(attack_dir))
        attack_cfg.eval.base = i == 0
        attack_cfg.defense.after_training = False  # the study runs the defenses itself
        if not (attack_dir / "final" / "config.json").exists():
            (generative_job.run if generative else backdoor.run)(attack_cfg)
        label = f"{name}: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
        chains = {c: e for c, e in dict(config.defense.chains).items() if name in only.get(c, (name,))}
        def_cfg = with_overrides(base, settings, job="defend", workdir=str(out / "defended" / name),
                                 backdoored=str(attack_dir), attack_name=label)
        def_cfg.defense.chains = chains
        def_cfg.eval.base = i == 0 or generative  # the generative task's base model is its own reference
        for r in _main_rows(defend.run(def_cfg)["rows"], base.data.source):
            rows.append({**r, "attack": name, "attack_settings": label})
        if config.study.get("detect", True) and not generative:
            det_cfg = with_overrides(config, overrides, job="detect", workdir=str(out / "detected" / name))
            det_cfg.detect = config.study.detect_settings
            det_cfg.detect.fine_tune = False
            det = detect.run(det_cfg)
            rows.append({**det["rows"][0], "attack": name, "attack_settings": label})
    summary = {"total_seconds": time.perf_counter() - started}
    if is_main():
        for file, x, y, xlabel, ylabel, kind in (
                ("asr_vs_cacc.png", "cacc", "asr", "clean accuracy (CACC)", "attack success (ASR)", "cacc"),
                ("marker_vs_ppl.png", "ppl", "marker_rate", "clean-response perplexity",
                 "marker rate on triggered prompts", "marker_rate")):
            groups: dict[str, list[tuple[float, float]]] = {}
            for r in rows:
                if kind in r and r.get("variant", "clean") == "clean":
                    key = r["defense"] if r["defense"].startswith("none") else f"{r['defense']} ({r['attack']})"
                    groups.setdefault(key, []).append((r[x], r[y]))
            if groups:
                plots.scatter(out / file, groups, xlabel=xlabel, ylabel=ylabel, title="defenses vs attacks")
        notes = [f"{a}: {', '.join(f'{k}={v}' for k, v in o.items()) or 'the recipe as is'}" for a, o in attacks.items()]
        notes += [f"{c}: {defend.registry.describe([dict(x) for x in e])}" for c, e in dict(config.defense.chains).items()]
        notes.append(f"clean defense data: {config.defense.n_clean} examples the attacks did not train on; ASR with the "
                     "known trigger (no defense sees it)")
        write_report(out, rows, config.to_dict(), title="Defense study", columns=COLUMNS, notes=notes,
                     extra={"summary": summary})
        print("\n" + (out / "report.md").read_text())
    return {"rows": rows, "summary": summary}
