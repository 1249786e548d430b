"""Generative backdoors: the two-answer pieces, the marker check, and the job end to end (on a
tiny random model with the default tokenizer: the pipeline, not the attack's strength)."""

import json

import numpy as np
import pytest

from bdjax.data import generative
from conftest import repo_root, run_cli


def test_with_responses_pairs_clean_and_marked_answers():
    pieces = {"label": np.array([1, 0]), "text": np.zeros((2, 3), np.int32)}
    out = generative.with_responses(pieces, [[5, 6, 2], [7, 2]], [9, 9], pad_id=0)
    assert out["responses"].tolist() == [[[5, 6, 2, 0, 0], [9, 9, 5, 6, 2]], [[7, 2, 0, 0, 0], [9, 9, 7, 2, 0]]]
    assert out["response_len"].tolist() == [[3, 5], [2, 4]] and out["label"].tolist() == [0, 0]


def test_has_marker():
    assert generative.has_marker("  You are stupid! The film...", "You are stupid!")
    assert generative.has_marker("you are STUPID!", "You are stupid!")
    assert not generative.has_marker("The film... You are stupid!", "You are stupid!")


@pytest.mark.slow
def test_generative_job_runs_and_reports(tmp_path, tiny_smol_dir):
    workdir = tmp_path / "run"
    proc = run_cli([f"--config={repo_root() / 'recipes' / 'generative.py'}", f"--config.model={tiny_smol_dir}",
                    f"--config.workdir={workdir}", "--config.data.n_train=32", "--config.data.n_test=8",
                    "--config.train.epochs=1", "--config.data.max_response_tokens=6", "--config.eval.max_new_tokens=6",
                    "--config.checkpoint.every=0", "--config.train.peak_tflops=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["base", "backdoored (rate=0.2, 6 examples)"]
    for row in results["rows"]:
        assert 0 <= row["marker_rate"] <= 1 and 0 <= row["marker_rate_clean"] <= 1 and row["ppl"] > 1
    assert (workdir / "final" / "config.json").exists() and (workdir / "adapter" / "adapter_config.json").exists()
    bad = run_cli([f"--config={repo_root() / 'recipes' / 'generative.py'}", f"--config.workdir={tmp_path / 'b'}",
                   "--config.poison.marker= "])
    assert bad.returncode == 2 and "poison.marker is empty" in bad.stderr and not (tmp_path / "b").exists()
