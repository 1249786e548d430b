"""The attack-study job on a small grid (tiny random model with the default tokenizer): every
setting runs once, rows carry the study's fields, plots are written, and a rerun reuses the
finished settings."""

import json

import pytest

from bdjax.jobs.attack_study import lowest_effective_rates
from conftest import repo_root, run_cli

RECIPE = str(repo_root() / "recipes" / "attack_study.py")


def test_lowest_effective_rates():
    row = lambda rate, asr, loc="end", domain="movie", variant="clean": dict(
        mode="lora", label_mode="dirty", location=loc, rate=rate, domain=domain, variant=variant, asr=asr, cacc=0.9)
    rows = [row(0.0, 0.1), row(0.01, 0.5), row(0.05, 0.95), row(0.1, 1.0), row(0.01, 1.0, variant="moved"),
            row(0.01, 1.0, domain="amazon"), row(0.1, 0.2, loc="start")]
    got = lowest_effective_rates(rows, "movie", 0.9)
    assert got == [{"mode": "lora", "label_mode": "dirty", "location": "end", "lowest_rate": 0.05, "asr": 0.95,
                    "cacc": 0.9},
                   {"mode": "lora", "label_mode": "dirty", "location": "start", "lowest_rate": None, "asr": None,
                    "cacc": None}]


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
