"""The attack-study job on a small grid (tiny random model with the default tokenizer): every
setting runs once, rows carry the study's fields, plots are written, and a rerun reuses the
finished settings."""

import json

import pytest

from bdjax.jobs.attack_study import bisect_next, decided_rates, lowest_effective_rates, next_setting, settings
from conftest import repo_root, run_cli

RECIPE = str(repo_root() / "recipes" / "attack_study.py")


def _row(rate, asr, loc="end", domain="movie", variant="clean", mode="lora"):
    return dict(mode=mode, label_mode="dirty", location=loc, rate=rate, domain=domain, variant=variant, asr=asr,
                cacc=0.9)


def test_lowest_effective_rates():
    rows = [_row(0.0, 0.1), _row(0.01, 0.5), _row(0.05, 0.95), _row(0.1, 1.0), _row(0.01, 1.0, variant="moved"),
            _row(0.01, 1.0, domain="amazon"), _row(0.1, 0.2, loc="start"), _row(0.02, 1.0, loc="middle")]
    got = lowest_effective_rates(rows, "movie", 0.9, rates=(0.005, 0.01, 0.02, 0.05, 0.1))
    assert got == [{"mode": "lora", "label_mode": "dirty", "location": "end", "lowest_rate": 0.05, "asr": 0.95,
                    "cacc": 0.9, "highest_short": 0.01, "unresolved": [0.02]},
                   {"mode": "lora", "label_mode": "dirty", "location": "middle", "lowest_rate": 0.02, "asr": 1.0,
                    "cacc": 0.9, "highest_short": None, "unresolved": [0.005, 0.01]},
                   {"mode": "lora", "label_mode": "dirty", "location": "start", "lowest_rate": None, "asr": None,
                    "cacc": None, "highest_short": 0.1, "unresolved": []}]


RATES = (0.005, 0.01, 0.02, 0.05, 0.1)


def test_decided_rates_follow_from_the_measured_ones():
    assert decided_rates(RATES, {}) == {}
    assert decided_rates(RATES, {0.02: True}) == {0.02: True, 0.05: True, 0.1: True}
    assert decided_rates(RATES, {0.02: False}) == {0.005: False, 0.01: False, 0.02: False}
    assert decided_rates(RATES, {0.01: False, 0.1: True}) == {0.005: False, 0.01: False, 0.1: True}


@pytest.mark.parametrize("lowest", [*RATES, None])
def test_bisection_finds_the_lowest_effective_rate(lowest):
    """Against every place the threshold can fall (ASR growing with the rate), the bisection
    trains at most 3 of the 5 rates, and what it measured pins the lowest effective rate exactly:
    the lowest-rate table has nothing unresolved and names the true rate."""
    outcome = {}
    while (rate := bisect_next(RATES, outcome)) is not None:
        assert rate not in outcome
        outcome[rate] = lowest is not None and rate >= lowest
    assert len(outcome) <= 3
    assert set(decided_rates(RATES, outcome)) == set(RATES)
    rows = [_row(r, 1.0 if ok else 0.1) for r, ok in outcome.items()]
    got = lowest_effective_rates(rows, "movie", 0.9, rates=RATES)
    assert len(got) == 1 and got[0]["lowest_rate"] == lowest and got[0]["unresolved"] == []


def test_next_setting_runs_references_first_then_each_setting_by_bisection():
    c = _study_config(modes=("lora",), label_modes=("dirty",), locations=("start", "end"), rates=RATES)
    grid = settings(c)
    name = lambda g: g.workdir.split("/")[-1]
    pick = lambda finished, search="bisect": (lambda g: g and name(g))(next_setting(grid, finished, search, "movie", 0.9))
    rows = lambda g, asr: [_row(g.poison.rate, asr, loc=g.poison.location)]
    assert pick({}) == "lora-clean" and pick({}, "grid") == "lora-clean"
    finished = {"lora-clean": [_row(0.0, 0.1)]}
    assert pick(finished) == "lora-dirty-start-0.02" and pick(finished, "grid") == "lora-dirty-start-0.005"
    by_name = {name(g): g for g in grid}
    finished["lora-dirty-start-0.02"] = rows(by_name["lora-dirty-start-0.02"], 0.95)
    assert pick(finished) == "lora-dirty-start-0.01"
    finished["lora-dirty-start-0.01"] = rows(by_name["lora-dirty-start-0.01"], 0.3)  # start: settled at 2%
    assert pick(finished) == "lora-dirty-end-0.02"
    for g in grid:  # every end rate short: 0.02, then 0.1 settle it
        if g.poison.location == "end" and g.poison.rate in (0.02, 0.1):
            finished[name(g)] = rows(g, 0.2)
    assert pick(finished) is None
    assert pick(finished, "grid") == "lora-dirty-start-0.005"


def _study_config(**study):
    import sys

    sys.path.insert(0, str(repo_root() / "recipes"))
    from attack_study import get_config

    c = get_config()
    for k, v in study.items():
        setattr(c.study, k, v)
    return c


def _results(path, config, rows):
    path.write_text(json.dumps({"rows": rows, "config": config.to_dict(), "summary": {}}))
    return str(path)


def test_merge_takes_settings_of_the_same_study(tmp_path):
    from bdjax.jobs.attack_study import merged_settings

    c = _study_config(modes=("lora",), locations=("end",), rates=(0.01,))
    other = _study_config(modes=("lora", "full"), locations=("end", "start"), rates=(0.05, 0.1))
    other.workdir = "/elsewhere"
    first = _results(tmp_path / "a.json", other, [_row(0.05, 1.0), _row(0.05, 0.9, domain="amazon"),
                                                  _row(0.0, 0.1, loc="random", mode="full")])
    (tmp_path / "run").mkdir()
    second = _results(tmp_path / "run" / "results.json", other, [_row(0.05, 0.2), _row(0.1, 1.0)])
    got = merged_settings(c, (first, str(tmp_path / "run")))
    assert sorted(got) == ["full-clean", "lora-dirty-end-0.05", "lora-dirty-end-0.1"]
    assert got["lora-dirty-end-0.05"] == (first, [_row(0.05, 1.0), _row(0.05, 0.9, domain="amazon")])  # first wins
    assert got["lora-dirty-end-0.1"][0] == second


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.poison, "trigger", "cf tq"), "differs in poison.trigger"),
    (lambda c: setattr(c.train, "epochs", 3), "differs in train.epochs"),
    (lambda c: setattr(c, "job", "backdoor"), "is not the results.json of an attack study"),
])
def test_merge_refuses_another_study(tmp_path, change, message):
    from bdjax.errors import ConfigError
    from bdjax.jobs.attack_study import merged_settings

    c, other = _study_config(), _study_config()
    change(other)
    path = _results(tmp_path / "results.json", other, [_row(0.05, 1.0)])
    with pytest.raises(ConfigError, match=message):
        merged_settings(c, (path,))
    with pytest.raises(ConfigError, match="cannot read"):
        merged_settings(c, (str(tmp_path / "missing.json"),))


def _without(config, dotted):
    d = config.to_dict()
    section, key = dotted.split(".")
    del d[section][key]
    return d


def test_merge_of_an_older_study_that_lacks_a_newer_key(tmp_path):
    """An older results.json without `train.matmul_dtype` ran its products in float32: it merges
    into a float32 run, not into a bfloat16 one; a key only one side has that is not listed as
    added later is a difference."""
    from bdjax.errors import ConfigError
    from bdjax.jobs.attack_study import merged_settings, study_differences

    c = _study_config()
    older = tmp_path / "older.json"
    older.write_text(json.dumps({"rows": [_row(0.05, 1.0)], "config": _without(c, "train.matmul_dtype")}))
    assert sorted(merged_settings(c, (str(older),))) == ["lora-dirty-end-0.05"]
    c.train.matmul_dtype = "bfloat16"
    with pytest.raises(ConfigError, match="differs in train.matmul_dtype"):
        merged_settings(c, (str(older),))
    assert study_differences(_without(c, "train.share_prefix"), c.to_dict()) == []
    assert study_differences(c.to_dict(), _without(c, "train.epochs")) == ["train.epochs"]


@pytest.mark.slow
def test_small_study(tmp_path, tiny_smol_dir):
    workdir = tmp_path / "study"
    common = [f"--config={RECIPE}", f"--config.model={tiny_smol_dir}", f"--config.workdir={workdir}",
              "--config.data.n_train=32", "--config.data.n_test=8", "--config.train.epochs=1",
              "--config.study.locations=('end',)",
              "--config.eval.moved=('start',)", "--config.eval.synonyms=()", "--config.eval.domains=('amazon',)",
              "--config.checkpoint.every=0",
              "--config.train.peak_tflops=1"]
    args = common + ["--config.study.rates=(0.25,)"]
    proc = run_cli(args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    rows = results["rows"]
    settings = {(r["mode"], r["label_mode"], r["location"], r["rate"]) for r in rows}
    assert settings == {("lora", "dirty", "random", 0.0), ("full", "dirty", "random", 0.0),
                        ("lora", "dirty", "end", 0.25), ("lora", "clean", "end", 0.25),
                        ("full", "dirty", "end", 0.25), ("full", "clean", "end", 0.25)}
    assert len(rows) == 6 * 3  # per setting: planted trigger, moved trigger, amazon transfer
    for r in rows:
        assert {"location", "rate", "label_mode", "domain", "variant", "cacc", "asr"} <= r.keys()
    assert {(r["domain"], r["variant"]) for r in rows} == {("movie", "clean"), ("movie", "moved"), ("amazon", "clean")}
    assert (workdir / "asr_vs_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "cacc_vs_asr.png").read_bytes()[:4] == b"\x89PNG"
    assert "lowest rate with ASR >= 0.9" in (workdir / "report.md").read_text()
    again = run_cli(args, timeout=900)  # finished settings are reused, not retrained
    assert again.returncode == 0 and "train (" not in again.stderr
    assert json.loads((workdir / "results.json").read_text())["rows"] == rows
    wider = run_cli(common + ["--config.study.rates=(0.125, 0.25, 0.125)", "--config.study.report_only=True"], timeout=900)
    assert wider.returncode == 0 and "train (" not in wider.stderr  # the 0.125 settings are reported, not run
    results = json.loads((workdir / "results.json").read_text())
    key = lambda r: json.dumps(r, sort_keys=True)
    assert sorted(results["rows"], key=key) == sorted(rows, key=key)  # grid order differs; the rows do not
    assert sorted(results["summary"]["not_run"]) == ["full-clean-end-0.125", "full-dirty-end-0.125", "lora-clean-end-0.125",
                                                     "lora-dirty-end-0.125"]
    assert "not run (study.report_only): 4 of 10 settings" in (workdir / "report.md").read_text()
    joined = tmp_path / "joined"  # another workdir reports the first one's settings through study.merge
    common[2] = f"--config.workdir={joined}"
    merged = run_cli(common + ["--config.study.rates=(0.25,)", "--config.study.report_only=True",
                               f"--config.study.merge=('{workdir / 'results.json'}',)"], timeout=900)
    assert merged.returncode == 0 and "train (" not in merged.stderr, merged.stderr[-3000:]
    results = json.loads((joined / "results.json").read_text())
    assert sorted(results["rows"], key=key) == sorted(rows, key=key) and results["summary"]["not_run"] == []
    assert "taken from other runs (study.merge)" in (joined / "report.md").read_text()


@pytest.mark.slow
def test_bisect_study_trains_only_what_the_lowest_rate_needs(tmp_path, tiny_smol_dir):
    """study.search=bisect on a real (tiny) run: the settings it trained are the ones the bisection
    asks for given what they measured, and every rate it skipped is implied by them."""
    workdir = tmp_path / "bisect"
    rates = (0.0625, 0.125, 0.25)
    proc = run_cli([f"--config={RECIPE}", f"--config.model={tiny_smol_dir}", f"--config.workdir={workdir}",
                    "--config.data.n_train=32", "--config.data.n_test=8", "--config.train.epochs=1",
                    "--config.study.modes=('lora',)", "--config.study.label_modes=('dirty',)",
                    "--config.study.locations=('end',)", f"--config.study.rates={rates}",
                    "--config.study.clean_reference=False", "--config.study.search=bisect",
                    "--config.eval.moved=()", "--config.eval.synonyms=()", "--config.eval.domains=()",
                    "--config.checkpoint.every=0", "--config.train.peak_tflops=1"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    measured = {r["rate"]: r["asr"] >= 0.9 for r in results["rows"]}
    assert len(measured) == 2  # the middle rate, then the one its outcome leaves undecided
    replay = {}  # the bisection's choices, fed the outcomes the run measured
    while (rate := bisect_next(rates, replay)) is not None:
        replay[rate] = measured[rate]
    assert replay == measured
    summary = results["summary"]
    assert summary["search"] == "bisect"
    assert sorted(summary["not_run"]) == sorted(f"lora-dirty-end-{r:g}" for r in rates if r not in measured)
    implied = decided_rates(rates, measured)
    assert summary["implied"] == {f"lora-dirty-end-{r:g}": "reached" if implied[r] else "short"
                                  for r in rates if r not in measured}
    assert summary["lowest_effective_rates"][0]["unresolved"] == []
    report = (workdir / "report.md").read_text()
    assert "not run (study.search=bisect): 1 of 3 settings" in report and "implied by a measured rate" in report


def test_unknown_search_is_refused(tmp_path):
    proc = run_cli([f"--config={RECIPE}", f"--config.workdir={tmp_path / 'w'}", "--config.study.search=binary"])
    assert proc.returncode == 2 and "study.search='binary' must be one of" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_grid_drops_repeated_values():
    import sys

    sys.path.insert(0, str(repo_root() / "recipes"))
    from attack_study import get_config

    from bdjax.jobs.attack_study import settings

    c = get_config()
    c.study.modes, c.study.label_modes, c.study.locations = ("lora",), ("dirty", "dirty"), ("end",)
    c.study.rates = (0.05, 0.01, 0.05)  # as `--config.study.rates=(0.05,) --config.study.rates=(0.01, 0.05)` gives
    names = [s.workdir.split("/")[-1] for s in settings(c)]
    assert names == ["lora-clean", "lora-dirty-end-0.05", "lora-dirty-end-0.01"]
