"""Multi-process runs: 2 JAX processes on localhost (CPU, gloo) train like 1 process, and a
coordinator that never answers fails in one line within the timeout."""

import json
import os
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import repo_root, run_cli

RECIPE = str(repo_root() / "recipes" / "quickstart.py")


def _args(model, workdir):
    return [f"--config.model={model}", f"--config.workdir={workdir}", "--config.defense.after_training=False",
            "--config.data.n_train=64",
            "--config.data.n_test=16", "--config.train.epochs=1", "--config.train.batch_size=16",
            "--config.train.warmup_steps=0", "--config.eval.base=False", "--config.eval.generate_examples=16",
            "--config.eval.max_new_tokens=2", "--config.checkpoint.every=2", "--config.train.peak_tflops=1"]


def _losses(workdir):
    return np.array([json.loads(line)["loss"] for line in (workdir / "train_log.jsonl").read_text().splitlines()])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_smol_dir):
    one = run_cli(["--config=" + RECIPE, *_args(tiny_smol_dir, tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "BDJAX_LOG_DIR": str(tmp_path)}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    two = subprocess.run(["bash", "launch/multiprocess.sh", "2", RECIPE, *_args(tiny_smol_dir, tmp_path / "two")],
                         cwd=repo_root(), env=env, capture_output=True, text=True, timeout=900)
    worker_log = (tmp_path / "bdjax-proc-1.log").read_text() if (tmp_path / "bdjax-proc-1.log").exists() else ""
    assert two.returncode == 0, two.stderr[-3000:] + worker_log[-2000:]
    assert "--process_id=1" in two.stderr and "--coordinator=127.0.0.1:" in two.stderr  # the commands it ran
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=2e-5)
    summary = json.loads((tmp_path / "two" / "results.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert "train (poisoned" not in worker_log  # only process 0 shows progress
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())[-1] == "4"


def test_a_coordinator_that_never_answers_fails_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    start = time.monotonic()
    proc = run_cli([f"--config={RECIPE}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
                    "--init_timeout=3"], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"coordinator at 127.0.0.1:{port} did not answer within 3 s" in lines[0]
    assert time.monotonic() - start < 60
