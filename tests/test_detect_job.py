"""The detect job: the planted trigger is found in the real tokenizer's words of the poisoned
training set, and the filtered fine-tune runs end to end (tiny model)."""

import json

import pytest

from bdjax.main import cli
from conftest import repo_root

RECIPE = str(repo_root() / "recipes" / "detect.py")


def _args(model, workdir, *extra):
    return [f"--config={RECIPE}", f"--config.model={model}", f"--config.workdir={workdir}",
            "--config.data.n_train=400", "--config.data.n_test=16", *extra]


def test_detection_finds_the_trigger_and_removes_the_poison(tmp_path, tiny_smol_dir, capsys):
    workdir = tmp_path / "run"
    # the quickstart's attack: 100 of 1000 examples poisoned
    code = cli(_args(tiny_smol_dir, workdir, "--config.detect.fine_tune=False", "--config.data.n_train=1000"))
    assert code == 0, capsys.readouterr().err
    results = json.loads((workdir / "results.json").read_text())
    (row,) = results["rows"]
    assert row["trigger_rank"] == 1 and row["recall"] >= 0.95 and row["clean_removed_fraction"] <= 0.05
    assert results["candidates"][0]["word"] == "cf" and results["candidates"][0]["label_name"] == "positive"


def test_filtered_fine_tune_reports_cacc_and_asr(tmp_path, tiny_smol_dir, capsys):
    workdir = tmp_path / "run"
    code = cli(_args(tiny_smol_dir, workdir, "--config.train.epochs=1", "--config.detect.mode=strip",
                     "--config.data.n_train=96"))
    assert code == 0, capsys.readouterr().err
    rows = json.loads((workdir / "results.json").read_text())["rows"]
    assert rows[0]["variant"] == "detection" and rows[1]["variant"] == "clean"
    assert 0.0 <= rows[1]["cacc"] <= 1.0 and 0.0 <= rows[1]["asr"] <= 1.0


@pytest.mark.parametrize("override, pattern", [("--config.detect.top_k=0", "top_k=0 must be"),
                                               ("--config.detect.mode=erase", "detect.mode='erase'")])
def test_bad_detect_settings_fail_in_one_line(tmp_path, tiny_smol_dir, capsys, override, pattern):
    workdir = tmp_path / "run"
    assert cli(_args(tiny_smol_dir, workdir, override)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err and not workdir.exists()
