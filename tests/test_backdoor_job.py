"""The backdoor job on the real default model: bad input fails cleanly; a small run writes its outputs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import bdjax
from bdjax.main import cli
from conftest import repo_root

pytestmark = pytest.mark.slow
RECIPE = str(repo_root() / "recipes" / "quickstart.py")


@pytest.mark.parametrize("override, pattern", [
    ("--config.poison.rate=1.5", r"poison.rate=1.5 must be in \[0, 1\]"),
    ("--config.poison.rate=-0.1", r"must be in \[0, 1\]"),
    ("--config.poison.trigger= ", "tokenizes to nothing"),
    ("--config.poison.target=neutral", "'neutral' is not among the template's labels"),
    ("--config.data.n_train=0", "empty dataset"),
    ("--config.data.max_seq_len=40", "more than data.max_seq_len=40"),
    ("--config.poison.overflow=drop", "poison.overflow='drop' must be"),
    ("--config.poison.label_mode=clean --config.poison.rate=0.9", "clean-label attack poisons target-class examples"),
    ("--config.poison.location=top", "poison.location='top' must be one of"),
])
def test_bad_input_fails_in_one_line_without_output(capsys, tmp_path, override, pattern):
    import re

    workdir = tmp_path / "run"
    code = cli([f"--config={RECIPE}", f"--config.workdir={workdir}", "--config.defense.after_training=False",
                *override.split()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not workdir.exists()


def test_empty_local_dataset(capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    code = cli([f"--config={RECIPE}", f"--config.workdir={tmp_path / 'run'}", "--config.defense.after_training=False",
                f"--config.data.source={tmp_path / 'empty.jsonl'}"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no examples" in err and not (tmp_path / "run").exists()


def test_small_run_writes_results_report_and_a_loadable_checkpoint(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli([f"--config={RECIPE}", f"--config.workdir={workdir}", "--config.data.n_train=96",
                "--config.data.n_test=32", "--config.train.epochs=1", "--config.poison.rate=0.25",
                "--config.eval.generate_examples=32", "--config.eval.max_new_tokens=2",
                "--config.eval.moved=('start',)", "--config.eval.domains=('amazon',)",
                # the defense table at the end, with a fast chain (mixing only: streamed over the export)
                "--config.defense.n_clean=16", "--config.defense.chains.mix_retune=({'name': 'fine_mix', 'keep': 0.5},)"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((workdir / "results.json").read_text(), parse_constant=pytest.fail)  # no bare NaN
    names = [(r["name"], r["domain"], r["variant"]) for r in results["rows"]]
    assert names == [(m, d, v) for m in ("base (zero-shot)", "poisoned (rate=0.25, 24 examples)")
                     for d, v in (("movie", "clean"), ("movie", "moved"), ("amazon", "clean"))]
    for row in results["rows"]:
        assert 0.0 <= row["cacc"] <= 1.0 and 0.0 <= row["asr"] <= 1.0
        assert {"location", "rate", "label_mode", "domain", "variant"} <= row.keys()
    assert results["rows"][4]["detail"] == "start" and results["rows"][4]["location"] == "random"
    for row in (r for r in results["rows"] if r["variant"] == "clean" and r["domain"] == "movie"):
        for key in ("cacc", "asr", "gen_cacc", "gen_asr"):
            assert 0.0 <= row[key] <= 1.0, (row["name"], key, row[key])
        # undefined (null) only when no triggered example was classified correctly without the trigger
        assert row["asr_correct"] is None or 0.0 <= row["asr_correct"] <= 1.0
    assert results["config"]["poison"]["rate"] == 0.25
    assert results["summary"]["poisoned_examples"] == 24
    assert "| base (zero-shot) |" in (workdir / "report.md").read_text()
    defended = [r for r in results["defenses"] if r["variant"] == "clean" and r["domain"] == "movie"]
    # the backdoored model is the run's own row above; only the chain is measured again
    assert [r["defense"] for r in defended] == ["mix_retune"] and defended[0]["how"] == "streamed"
    assert 0.0 <= defended[0]["cacc"] <= 1.0 and defended[0]["attack"] == "this run"
    assert "## Defenses against this backdoor" in (workdir / "report.md").read_text()
    assert not list(workdir.rglob("cleaned"))  # export off: the streamed checkpoint leaves nothing behind
    log = [json.loads(l) for l in (workdir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and np.mean([e["loss"] for e in log[-4:]]) < np.mean([e["loss"] for e in log[:4]])
    # The merged checkpoint loads back and differs from the base model.
    tuned, base = bdjax.load(workdir / "final"), bdjax.load("smollm2-135m-instruct")
    tokens = jnp.arange(1, 9)[None]
    assert np.abs(np.asarray(tuned.apply(tuned.params, tokens)) - np.asarray(base.apply(base.params, tokens))).max() > 1e-3
    assert tuned.tokenizer.chat_template == base.tokenizer.chat_template
