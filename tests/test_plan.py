"""`bdjax plan`: ahead-of-time compilation of the scale-out recipes on simulated meshes, from
shapes only, with per-device memory from XLA's analysis."""

import json

import pytest

from conftest import repo_root, run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe, devices, limit_gib", [("llama3_8b_lora_gpu.py", 8, 40),
                                                         ("llama3_70b_lora_tpu.py", 64, 60)])
def test_scale_out_recipes_plan_within_memory(recipe, devices, limit_gib):
    proc = run_cli(["plan", f"--config={repo_root() / 'recipes' / recipe}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == devices
    assert result["per_device_bytes"] <= limit_gib * 1024**3
    # the frozen base is sharded: each device holds about 1/(fsdp·tensor) of it
    n_params = 8.03e9 if "8b" in recipe else 70.6e9
    assert result["params_bytes"] < 2 * n_params * 2 / devices
    assert result["temp_bytes"] > 0 and result["flops_per_step"] > 6 * n_params * 0.5 * result["tokens_per_step"]
    assert "temporaries" in proc.stdout


def test_plan_rejects_a_mesh_that_does_not_fit(tmp_path):
    proc = run_cli(["plan", f"--config={repo_root() / 'recipes' / 'llama3_8b_lora_gpu.py'}", "--config.mesh.tensor=3"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "does not divide the 8 devices" in lines[0], proc.stderr
