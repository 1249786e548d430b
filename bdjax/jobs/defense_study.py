"""The `defense_study` job: every defense chain against every attack of the study, one table.

For each attack in `study.attacks` ({name: ((dotted recipe key, value), ...)}, applied to this recipe's
backdoor settings) the backdoored model is trained into `workdir/attacks/<name>` (kept and resumed:
a finished attack is not retrained), then the `defense.chains` that apply to it
(`study.only[chain]` lists the attacks a chain is meant for, e.g. E-PUR needs a full fine-tune)
run through the `defend` job into `workdir/defended/<name>`, and word-frequency detection through
the `detect` job. Rows: `defense`, `attack`, `cacc`, `asr` (+ detection precision/recall);
`report.md` and `asr_vs_cacc.png` (the pretrained and backdoored models as reference points).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ml_collections

from bdjax import plots
from bdjax.errors import ConfigError
from bdjax.jobs import backdoor, defend, detect
from bdjax.jobs.training import is_main
from bdjax.report import write as write_report

COLUMNS = ["attack", "defense", "cacc", "asr", "asr_correct", "precision", "recall", "clean_removed_fraction",
           "trigger_rank", "seconds"]


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


def _clean_rows(rows: list[dict], source: str) -> list[dict]:
    return [r for r in rows if r.get("variant") == "clean" and r.get("domain") == source]


def run(config: ml_collections.ConfigDict) -> dict:
    started = time.perf_counter()
    defend.check_config(config)
    attacks = {name: dict(o) for name, o in dict(config.study.attacks).items()}
    only = {k: tuple(v) for k, v in dict(config.study.get("only", {})).items()}
    unknown = sorted(set(only) - set(dict(config.defense.chains)))
    if unknown:
        raise ConfigError(f"study.only names chains {unknown} that are not in defense.chains")
    out = Path(config.workdir)
    source = config.data.source
    rows: list[dict] = []
    for i, (name, overrides) in enumerate(attacks.items()):
        attack_dir = out / "attacks" / name
        attack_cfg = with_overrides(config, overrides, job="backdoor", workdir=str(attack_dir))
        attack_cfg.eval.base = i == 0
        attack_cfg.defense.after_training = False  # the study runs the defenses itself
        if not (attack_dir / "final" / "config.json").exists():
            backdoor.run(attack_cfg)
        label = f"{name}: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
        chains = {c: e for c, e in dict(config.defense.chains).items() if name in only.get(c, (name,))}
        def_cfg = with_overrides(config, overrides, job="defend", workdir=str(out / "defended" / name),
                                 backdoored=str(attack_dir), attack_name=label)
        def_cfg.defense.chains = chains
        def_cfg.eval.base = i == 0
        for r in _clean_rows(defend.run(def_cfg)["rows"], source):
            rows.append({**r, "attack": name, "attack_settings": label})
        if config.study.get("detect", True):
            det_cfg = with_overrides(config, overrides, job="detect", workdir=str(out / "detected" / name))
            det_cfg.detect = config.study.detect_settings
            det_cfg.detect.fine_tune = False
            det = detect.run(det_cfg)
            rows.append({**det["rows"][0], "attack": name, "attack_settings": label})
    summary = {"total_seconds": time.perf_counter() - started}
    if is_main():
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r.get("variant") == "clean":
                key = r["defense"] if r["defense"].startswith("none") else f"{r['defense']} ({r['attack']})"
                groups.setdefault(key, []).append((r["cacc"], r["asr"]))
        plots.scatter(out / "asr_vs_cacc.png", groups, xlabel="clean accuracy (CACC)", ylabel="attack success (ASR)",
                      title="defenses vs attacks")
        notes = [f"{a}: {', '.join(f'{k}={v}' for k, v in o.items()) or 'the recipe as is'}" for a, o in attacks.items()]
        notes += [f"{c}: {defend.registry.describe([dict(x) for x in e])}" for c, e in dict(config.defense.chains).items()]
        notes.append(f"clean defense data: {config.defense.n_clean} examples the attacks did not train on; ASR with the "
                     "known trigger (no defense sees it)")
        write_report(out, rows, config.to_dict(), title="Defense study", columns=COLUMNS, notes=notes,
                     extra={"summary": summary})
        print("\n" + (out / "report.md").read_text())
    return {"rows": rows, "summary": summary}
