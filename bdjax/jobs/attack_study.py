"""The `attack_study` job: a grid of poisoned fine-tunes (Raghuram, Kesidis & Miller 2024).

For every (fine-tuning mode, label mode, trigger location, poison rate) in `config.study`, poison
the same training set, fine-tune, and measure CACC/ASR on the training domain (with the recipe's
test-time variants) and on every transfer domain. The model, data and placed params are loaded
once; runs that differ only in the rate share compiled train steps, and every run shares the
compiled evaluation. Each finished setting is kept in `workdir/settings/<name>/rows.json`, so
an interrupted study skips what it has already done (and resumes a setting from its checkpoints);
with `study.report_only` it trains nothing and reports the finished settings of the grid, naming
the ones not run. With `study.search="bisect"` it runs, per (mode, label mode, location), only the
rates that a bisection needs to find the lowest one whose ASR reaches the threshold: a rate at or
above one that reached it, or at or below one that fell short, counts as decided (if ASR grows
with the rate) and is not trained, so each setting takes about log2(#rates) fine-tunes instead of
one per rate.

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

from bdjax import config_diff, plots
from bdjax.data import poison
from bdjax.errors import ConfigError
from bdjax.io import write_json_atomic
from bdjax.jobs import backdoor
from bdjax.jobs.training import MODES, is_main
from bdjax.report import markdown_table
from bdjax.report import write as write_report

SEARCHES = ("grid", "bisect")
COLUMNS = ["mode", "label_mode", "location", "rate", "domain", "variant", "detail", "cacc", "asr", "asr_correct"]


def setting_name(mode: str, label_mode: str, location: str, rate: float) -> str:
    return f"{mode}-{label_mode}-{location}-{rate:g}" if rate else f"{mode}-clean"


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
            c.workdir = str(Path(config.workdir) / "settings" / setting_name(mode, label_mode, location, rate))
        out.append(c)
    return out


def _hit(row: dict, threshold: float) -> bool:
    """Whether a result row's ASR reached the threshold."""
    return row["asr"] is not None and row["asr"] >= threshold


def lowest_effective_rates(rows: list[dict], domain: str, threshold: float, rates: tuple = ()) -> list[dict]:
    """Per (mode, label mode, location): the lowest rate whose ASR (trigger as planted, training
    domain) reaches `threshold`, or None; the highest measured rate below it that fell short; and
    the grid's `rates` between the two that were not measured (`unresolved`). If ASR grows with
    the rate, the lowest rate is exact once none remain; until then it is an upper bound."""
    measured: dict = {}
    for r in rows:
        if r["domain"] == domain and r["variant"] == "clean" and r["rate"]:
            measured.setdefault((r["mode"], r["label_mode"], r["location"]), []).append(r)
    out = []
    for key, rs in sorted(measured.items()):
        hits = [r for r in rs if _hit(r, threshold)]
        best = min(hits, key=lambda r: r["rate"]) if hits else None
        limit = best["rate"] if best else float("inf")
        short = [r["rate"] for r in rs if r["rate"] < limit and r not in hits]
        seen = {r["rate"] for r in rs}
        floor = max(short, default=0.0)
        out.append({"mode": key[0], "label_mode": key[1], "location": key[2],
                    "lowest_rate": best and best["rate"], "asr": best and best["asr"], "cacc": best and best["cacc"],
                    "highest_short": max(short, default=None),
                    "unresolved": [x for x in sorted(set(rates)) if floor < x < limit and x not in seen]})
    return out


def decided_rates(rates, outcome: dict[float, bool]) -> dict[float, bool]:
    """The rates of one setting whose outcome (ASR reached the threshold or not) is known: measured
    (`outcome`), or implied by a measured one if ASR grows with the rate (at or above a rate that
    reached it: reached; at or below one that fell short: short)."""
    lowest_hit = min((r for r, ok in outcome.items() if ok), default=float("inf"))
    highest_short = max((r for r, ok in outcome.items() if not ok), default=float("-inf"))
    out = {}
    for r in sorted(set(rates)):
        if r in outcome:
            out[r] = outcome[r]
        elif r >= lowest_hit:
            out[r] = True
        elif r <= highest_short:
            out[r] = False
    return out


def bisect_next(rates, outcome: dict[float, bool]) -> float | None:
    """The next rate of one setting to train in a bisection for its lowest effective rate (the
    middle of the undecided ones), or None once every rate is decided."""
    known = decided_rates(rates, outcome)
    undecided = [r for r in sorted(set(rates)) if r not in known]
    return undecided[len(undecided) // 2] if undecided else None


def _name(c: ml_collections.ConfigDict) -> str:
    return Path(c.workdir).name


def _key(c: ml_collections.ConfigDict) -> tuple[str, str, str]:
    return c.train.mode, c.poison.label_mode, c.poison.location


def _rates(grid: list, key: tuple[str, str, str]) -> list[float]:
    return [g.poison.rate for g in grid if g.poison.rate and _key(g) == key]


def _reached(rows: list[dict], domain: str, threshold: float) -> bool | None:
    """Whether a setting's ASR (trigger as planted, training domain) reached the threshold."""
    for r in rows:
        if r["domain"] == domain and r["variant"] == "clean":
            return _hit(r, threshold)
    return None


def outcomes(grid: list, finished: dict[str, list[dict]], domain: str, threshold: float) -> dict[tuple, dict]:
    """Per (mode, label mode, location) of the grid's poisoned settings: {rate: reached} over the
    finished ones."""
    out: dict[tuple, dict] = {}
    for c in grid:
        if c.poison.rate:
            got = finished.get(_name(c))
            ok = None if got is None else _reached(got, domain, threshold)
            out.setdefault(_key(c), {})
            if ok is not None:
                out[_key(c)][c.poison.rate] = ok
    return out


def next_setting(grid: list, finished: dict[str, list[dict]], search: str, domain: str, threshold: float):
    """The next grid setting to train, or None: in grid order (`grid`), or the clean references
    and then, setting by setting, the rate a bisection asks for (`bisect`)."""
    todo = [c for c in grid if _name(c) not in finished]
    if search == "grid" or not todo:
        return todo[0] if todo else None
    for c in todo:
        if not c.poison.rate:
            return c
    seen = outcomes(grid, finished, domain, threshold)
    for c in todo:
        if bisect_next(_rates(grid, _key(c)), seen[_key(c)]) == c.poison.rate:
            return c
    return None


# The grid's axes, how it is searched and where results go: two runs that differ only here ran
# the same study.
GRID_KEYS = ("workdir", "study.modes", "study.label_modes", "study.locations", "study.rates",
             "study.clean_reference", "study.report_only", "study.merge", "study.asr_threshold", "study.search")


def study_differences(ours: dict, theirs: dict) -> list[str]:
    """Dotted config keys on which two attack studies differ, besides the grid axes and workdir
    (`config_diff.differences`: keys added to bdjax since a study ran count only when set to
    something other than what that study did)."""
    return config_diff.differences(ours, theirs, ignore=GRID_KEYS)


def merged_settings(config: ml_collections.ConfigDict, paths) -> dict[str, tuple[str, list[dict]]]:
    """Finished settings of other runs of the same study (`results.json` files or their run
    dirs), by setting name; the first file naming a setting wins. Raises `ConfigError` if a file
    is not an attack study's results or ran a different study (another trigger, data or schedule)."""
    ours = config.to_dict()
    out: dict[str, tuple[str, list[dict]]] = {}
    for p in paths:
        path = Path(p) / "results.json" if Path(p).is_dir() else Path(p)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"study.merge: cannot read {path} as JSON ({type(e).__name__}: {e})") from None
        if not (isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("config"), dict)
                and data["config"].get("job") == "attack_study"):
            raise ConfigError(f"study.merge: {path} is not the results.json of an attack study")
        diff = study_differences(ours, data["config"])
        if diff:
            raise ConfigError(f"study.merge: {path} ran a different study; it differs in {', '.join(diff[:5])}")
        found: dict[str, list[dict]] = {}
        for r in data["rows"]:
            try:
                name = setting_name(r["mode"], r["label_mode"], r["location"], r["rate"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"study.merge: {path} has a row without mode/label_mode/location/rate") from None
            found.setdefault(name, []).append(r)
        for name, rs in found.items():
            out.setdefault(name, (str(path), rs))
    return out


def run(config: ml_collections.ConfigDict) -> dict:
    started = time.perf_counter()
    backdoor.check_config(config)
    search = config.study.get("search", "grid")
    if search not in SEARCHES:
        raise ConfigError(f"study.search={search!r} must be one of {SEARCHES}")
    grid = settings(config)
    s = backdoor.setup(config)
    poisoned = {_name(c): backdoor.poisoned_set(c, s) for c in grid}  # all valid before the first fine-tune
    step_cache: dict = {}
    threshold = config.study.get("asr_threshold", 0.9)
    domain = config.data.source
    merged = merged_settings(config, config.study.get("merge", ()))
    finished: dict[str, list[dict]] = {}
    taken: dict[str, str] = {}
    for c in grid:
        name, done = _name(c), Path(c.workdir) / "rows.json"
        if done.exists():
            finished[name] = json.loads(done.read_text())
        elif name in merged:
            taken[name] = merged[name][0]
            finished[name] = merged[name][1]
    while not config.study.get("report_only", False):
        c = next_setting(grid, finished, search, domain, threshold)
        if c is None:
            break
        result = backdoor.attack(c, s, poisoned=poisoned[_name(c)], step_cache=step_cache)
        for r in result["rows"]:
            r["train_seconds"] = result["run"]["seconds"]
            r.pop("gen_examples", None)
        if is_main():
            write_json_atomic(Path(c.workdir) / "rows.json", result["rows"])
        finished[_name(c)] = result["rows"]
    rows = [r for c in grid for r in finished.get(_name(c), [])]
    not_run = [_name(c) for c in grid if _name(c) not in finished]
    seen = outcomes(grid, finished, domain, threshold)
    implied = {}
    for c in grid:  # what the measured rates say of the poisoned settings not run
        if _name(c) in finished or not c.poison.rate:
            continue
        ok = decided_rates(_rates(grid, _key(c)), seen[_key(c)]).get(c.poison.rate)
        if ok is not None:
            implied[_name(c)] = "reached" if ok else "short"
    lowest = lowest_effective_rates(rows, domain, threshold, tuple(config.study.rates))
    summary = {"settings": len(grid), "rows": len(rows), "total_seconds": time.perf_counter() - started,
               "lowest_effective_rates": lowest, "asr_threshold": threshold, "search": search, "not_run": not_run,
               "implied": implied, "merged": taken}
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
                 + markdown_table([{**r, "unresolved": ", ".join(f"{x:g}" for x in r["unresolved"]) or "none",
                                    "highest_short": "none" if r["highest_short"] is None else r["highest_short"]}
                                   for r in lowest], ["mode", "label_mode", "location", "lowest_rate", "asr", "cacc",
                                           "highest_short", "unresolved"])
                 + "\n\n`highest_short`: the highest measured rate below it whose ASR fell short; `unresolved`: "
                   "the grid's rates between the two not yet measured (while any remain, and ASR grows with the "
                   "rate, the lowest rate is an upper bound)",
                 "clean-tuned references: " + ", ".join(f"{m}: CACC {r['cacc']:.3f}, ASR {r['asr']:.3f}"
                                                        for m, r in clean.items()),
                 "variants: moved / partial / synonym triggers at test time; domains other than "
                 f"{config.data.source} are transfer", "plots: asr_vs_rate.png, cacc_vs_asr.png"]
        if taken:
            sources = {}
            for name, src in taken.items():
                sources.setdefault(src, []).append(name)
            notes.append("taken from other runs (study.merge): " + "; ".join(
                f"{src}: {', '.join(names)}" for src, names in sources.items()))
        if not_run:
            why = "study.report_only" if config.study.get("report_only", False) else f"study.search={search}"
            notes.append(f"not run ({why}): {len(not_run)} of {len(grid)} settings: {', '.join(not_run)}")
        if implied:
            notes.append(f"implied by a measured rate of the same setting, if ASR grows with the rate: {len(implied)} "
                         "of the settings not run; reached ASR >= threshold: "
                         + (", ".join(n for n, v in implied.items() if v == "reached") or "none")
                         + "; fell short: " + (", ".join(n for n, v in implied.items() if v == "short") or "none"))
        write_report(out, rows, config.to_dict(), title="Attack study", columns=COLUMNS, notes=notes,
                     extra={"summary": summary})
        print("\n" + (out / "report.md").read_text())
    return {"rows": rows, "summary": summary}
