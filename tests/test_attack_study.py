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
    args = [f"--config={RECIPE}", f"--config.model={tiny_smol_dir}", f"--config.workdir={workdir}",
            "--config.data.n_train=32", "--config.data.n_test=8", "--config.train.epochs=1",
            "--config.study.rates=(0.25,)", "--config.study.locations=('end',)",
            "--config.eval.moved=('start',)", "--config.eval.synonyms=()", "--config.eval.domains=('amazon',)",
            "--config.checkpoint.every=0",
            "--config.train.peak_tflops=1"]
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
