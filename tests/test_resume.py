"""Checkpoint and resume: a run killed with SIGKILL mid-training and restarted ends with LoRA
params bitwise equal to an uninterrupted run's; a different run may not resume from them."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bdjax.checkpoints.tensorfile import TensorFile
from conftest import repo_root, run_cli

pytestmark = pytest.mark.slow
RECIPE = str(repo_root() / "recipes" / "quickstart.py")


def _args(model, workdir):
    return [f"--config={RECIPE}", f"--config.model={model}", f"--config.workdir={workdir}",
            "--config.defense.after_training=False",
            "--config.data.n_train=256", "--config.data.n_test=16", "--config.train.epochs=2",
            "--config.eval.base=False", "--config.eval.generate=False", "--config.checkpoint.every=4",
            "--config.train.peak_tflops=1", "--config.export.merged=False"]


def _adapter(workdir):
    f = TensorFile(workdir / "adapter" / "adapter_model.safetensors")
    return {k: np.array(f.tensor(k)) for k in f.keys()}


def _committed(workdir) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, tiny_smol_dir):
    whole = run_cli(_args(tiny_smol_dir, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bdjax.main", *_args(tiny_smol_dir, killed)], cwd=repo_root(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.monotonic() + 300
    while not any(s >= 12 for s in _committed(killed)):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists() and not (killed / "adapter").exists()
    logged = len((killed / "train_log.jsonl").read_text().splitlines())

    resumed = run_cli(_args(tiny_smol_dir, killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((killed / "results.json").read_text())["summary"]
    assert 12 <= summary["resumed_at_step"] < summary["train_steps"] == 64
    a, b = _adapter(tmp_path / "whole"), _adapter(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bitwise
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 65))  # one trajectory: lines past the checkpoint dropped
    assert logged >= summary["resumed_at_step"]

    other = run_cli([*_args(tiny_smol_dir, killed), "--config.train.lr=0.01"])
    assert other.returncode == 2 and "holds checkpoints of a different run" in other.stderr
    assert "differs from this recipe in train.lr)" in other.stderr
