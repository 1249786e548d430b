"""The `attack_study` job: a grid of poisoned fine-tunes (Raghuram, Kesidis & Miller 2024).

For every (fine-tuning mode, label mode, trigger location, poison rate) in `config.study`, poison
the same training set, fine-tune, and measure CACC/ASR on the training domain (with the recipe's
test-time variants) and on every transfer domain. The model, data and placed params are loaded
once; runs that differ only in the rate share compiled train steps, and every run shares the
compiled evaluation. Each finished setting is kept in `workdir/settings/<name>/rows.json`, so
an interrupted study skips what it has already done (and resumes a setting from its checkpoints);
with `study.report_only` it trains nothing and reports the finished settings of the grid, naming
the ones not run.

Writes `results.json` (one row per model × domain × variant, each with `location`, `rate`,
`label_mode`, `mode`, `domain`, `variant`, `cacc`, `asr`), `report.md` (the lowest rate reaching
ASR ≥ the threshold per setting, then every row) and PNG plots: ASR vs poison rate per location,
and CACC vs ASR.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path

import ml_collections

from bdjax import plots
from bdjax.data import poison
from bdjax.errors import ConfigError
from bdjax.io import write_json_atomic
from bdjax.jobs import backdoor
from bdjax.jobs.training import MODES, is_main
from bdjax.report import markdown_table
from bdjax.report import write as write_report

COLUMNS = ["mode", "label_mode", "location", "rate", "domain", "variant", "detail", "cacc", "asr", "asr_correct"]


def settings(config) -> list[ml_collections.ConfigDict]:
    """One config per grid point (rate 0, the clean reference, once per mode). A value given twice
    on an axis (ml_collections appends a repeated tuple flag) is one grid point, not two."""
    st = config.study
    axes = [tuple(dict.fromkeys(getattr(st, k))) for k in ("modes", "label_modes", "locations", "rates")]
    for m in st.modes:
        if m not in MODES:
            raise ConfigError(f"study.modes entry {m!r} must be one of {MODES}")
    for loc, lm in itertools.product(st.locations, st.label_modes):
        poison.check_settings(loc, lm)
    for r in st.rates:
        poison.poison_count(r, 1)
    out = []
    grid = list(itertools.product(*axes))
    if st.get("clean_reference", True):
        grid = [(m, "dirty", config.poison.location, 0.0) for m in axes[0]] + grid
    for mode, label_mode, location, rate in grid:
        c = copy.deepcopy(config)
        with c.unlocked():
            c.train.mode, c.poison.label_mode, c.poison.location, c.poison.rate = mode, label_mode, location, rate
            if mode == "full" and st.get("full_lr"):
                c.train.lr = st.full_lr
            c.poison.count = -1
            name = f"{mode}-{label_mode}-{location}-{rate:g}" if rate else f"{mode}-clean"
            c.workdir = str(Path(config.workdir) / "settings" / name)
        out.append(c)
    return out


def lowest_effective_rates(rows: list[dict], domain: str, threshold: float) -> list[dict]:
    """Per (mode, label mode, location): the lowest rate whose ASR (trigger as planted, training
    domain) reaches `threshold`, or None."""
    table = {}
    for r in rows:
        if r["domain"] != domain or r["variant"] != "clean" or not r["rate"]:
            continue
        key = (r["mode"], r["label_mode"], r["location"])
        best = table.setdefault(key, None)
        if r["asr"] is not None and r["asr"] >= threshold and (best is None or r["rate"] < best["rate"]):
            table[key] = r
    return [{"mode": k[0], "label_mode": k[1], "location": k[2],
             "lowest_rate": None if v is None else v["rate"], "asr": None if v is None else v["asr"],
             "cacc": None if v is None else v["cacc"]} for k, v in sorted(table.items())]


def run(config: ml_collections.ConfigDict) -> dict:
    started = time.perf_counter()
    backdoor.check_config(config)
    grid = settings(config)
    s = backdoor.setup(config)
    poisoned = [backdoor.poisoned_set(c, s) for c in grid]  # every setting is valid before the first fine-tune
    step_cache: dict = {}
    rows: list[dict] = []
    not_run: list[str] = []
    for c, ps in zip(grid, poisoned):
        done = Path(c.workdir) / "rows.json"
        if done.exists():
            rows += json.loads(done.read_text())
            continue
        if config.study.get("report_only", False):
            not_run.append(Path(c.workdir).name)
            continue
        result = backdoor.attack(c, s, poisoned=ps, step_cache=step_cache)
        for r in result["rows"]:
            r["train_seconds"] = result["run"]["seconds"]
            r.pop("gen_examples", None)
        if is_main():
            write_json_atomic(done, result["rows"])
        rows += result["rows"]
    threshold = config.study.get("asr_threshold", 0.9)
    lowest = lowest_effective_rates(rows, config.data.source, threshold)
    summary = {"settings": len(grid), "rows": len(rows), "total_seconds": time.perf_counter() - started,
               "lowest_effective_rates": lowest, "asr_threshold": threshold, "not_run": not_run}
    if is_main():
        out = Path(config.workdir)
        main_rows = [r for r in rows if r["domain"] == config.data.source and r["variant"] == "clean"]
        clean = {r["mode"]: r for r in main_rows if not r["rate"]}
        series = {}
        for r in main_rows:
            if r["rate"]:
                series.setdefault(f"{r['mode']} {r['label_mode']} {r['location']}", []).append((r["rate"], r["asr"]))
        plots.lines(out / "asr_vs_rate.png", series, xlabel="poison rate", ylabel="ASR", logx=True,
                    title=f"ASR vs poison rate ({config.model}, {config.data.source})")
        groups = {}
        for r in rows:
            if r["variant"] == "clean":
                groups.setdefault("reference (rate 0)" if not r["rate"] else f"{r['mode']} {r['label_mode']}",
                                  []).append((r["asr"], r["cacc"]))
        plots.scatter(out / "cacc_vs_asr.png", groups, xlabel="ASR", ylabel="CACC",
                      title="clean accuracy vs attack success (all domains)")
        notes = [f"lowest rate with ASR >= {threshold} (trigger as planted, {config.data.source} test set):\n\n"
                 + markdown_table(lowest, ["mode", "label_mode", "location", "lowest_rate", "asr", "cacc"]),
                 "clean-tuned references: " + ", ".join(f"{m}: CACC {r['cacc']:.3f}, ASR {r['asr']:.3f}"
                                                        for m, r in clean.items()),
                 "variants: moved / partial / synonym triggers at test time; domains other than "
                 f"{config.data.source} are transfer", "plots: asr_vs_rate.png, cacc_vs_asr.png"]
        if not_run:
            notes.append(f"not run (study.report_only): {len(not_run)} of {len(grid)} settings: {', '.join(not_run)}")
        write_report(out, rows, config.to_dict(), title="Attack study", columns=COLUMNS, notes=notes,
                     extra={"summary": summary})
        print("\n" + (out / "report.md").read_text())
    return {"rows": rows, "summary": summary}
