"""Sharding: mesh construction and rules, and training on simulated 8-device meshes that matches
a 1-device run (same losses, same LoRA params)."""

import json

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bdjax.errors import ConfigError
from bdjax.sharding import DEFAULT_RULES, normalize_rules, resolve_shape, spec_for
from conftest import repo_root, run_cli

RECIPE = str(repo_root() / "recipes" / "quickstart.py")


class FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_resolve_shape_fills_minus_one_and_rejects_bad_meshes():
    assert resolve_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert resolve_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        resolve_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ConfigError, match="needs 6 devices; this run has 8"):
        resolve_shape({"data": 2, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="at most one -1"):
        resolve_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ConfigError, match="unknown axes"):
        resolve_shape({"pipeline": 2}, 8)


def test_rules_must_name_mesh_axes():
    with pytest.raises(ConfigError, match="unknown mesh axis 'fsdpp'"):
        normalize_rules([("embed", "fsdpp")])
    assert normalize_rules([("embed", None), ("batch", ("data", "fsdp"))]) == (("embed", ()),
                                                                                 ("batch", ("data", "fsdp")))


def test_spec_for_maps_logical_axes_and_replicates_what_does_not_divide():
    rules, mesh = normalize_rules(DEFAULT_RULES), FakeMesh(data=2, fsdp=2, tensor=2)
    assert spec_for(("layers", "embed", "heads", "head_dim"), (30, 576, 8, 64), rules, mesh) == P(None, "fsdp", "tensor")
    assert spec_for(("layers", "embed", "kv_heads", "head_dim"), (30, 576, 3, 64), rules, mesh) == P(None, "fsdp")
    assert spec_for(("batch", "length"), (8, 128), rules, mesh) == P(("data", "fsdp"))
    assert spec_for(("batch", "length"), (2, 128), rules, mesh) == P("data")  # 2 rows: only data divides
    # one mesh axis is used by one dimension at most
    assert spec_for(("embed", "embed"), (64, 64), rules, mesh) == P("fsdp")
    assert spec_for(("vocab", "embed"), (49152, 576), rules, FakeMesh(data=8, fsdp=1, tensor=1)) == P()


def _train_losses(workdir, devices: int, mesh: tuple[int, int, int], tiny_smol_dir, extra=()):
    proc = _run(workdir, devices, mesh, tiny_smol_dir, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.array([json.loads(line)["loss"] for line in (workdir / "train_log.jsonl").read_text().splitlines()])


def _run(workdir, devices, mesh, tiny_smol_dir, extra):
    data, fsdp, tensor = mesh
    return run_cli(["--config=" + RECIPE, f"--config.model={tiny_smol_dir}", f"--config.workdir={workdir}",
                    "--config.defense.after_training=False",
                    "--config.data.n_train=64", "--config.data.n_test=16", "--config.train.epochs=1",
                    "--config.train.batch_size=16", "--config.train.warmup_steps=0", "--config.eval.base=False",
                    "--config.eval.generate_examples=16", "--config.eval.max_new_tokens=2",
                    "--config.checkpoint.every=0", "--config.export.merged=False", "--config.train.peak_tflops=1",
                    f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
                    *extra], devices=devices)


def _train(workdir, devices: int, mesh: tuple[int, int, int], tiny_smol_dir, extra=()):
    proc = _run(workdir, devices, mesh, tiny_smol_dir, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    from bdjax.checkpoints.tensorfile import TensorFile
    f = TensorFile(workdir / "adapter" / "adapter_model.safetensors")
    return np.array([e["loss"] for e in log]), {k: np.array(f.tensor(k)) for k in f.keys()}, log


@pytest.mark.slow
def test_meshes_of_8_devices_match_one_device(tmp_path, tiny_smol_dir):
    ref_loss, ref_lora, _ = _train(tmp_path / "one", 1, (1, 1, 1), tiny_smol_dir)
    assert len(ref_loss) == 4 and np.all(np.isfinite(ref_loss))
    assert max(np.abs(v).max() for k, v in ref_lora.items() if "lora_B" in k) > 1e-4  # it did train
    for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        loss, lora, log = _train(tmp_path / "x".join(map(str, mesh)), 8, mesh, tiny_smol_dir)
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, err_msg=str(mesh))
        for k, v in ref_lora.items():
            np.testing.assert_allclose(lora[k], v, rtol=1e-4, atol=2e-6, err_msg=f"{mesh} {k}")
        assert all(e["tokens_per_s_per_device"] * 8 == pytest.approx(e["tokens_per_s"]) for e in log)


@pytest.mark.slow
@pytest.mark.parametrize("override, pattern", [
    ("--config.mesh.fsdp=3", "does not divide the 8 devices"),
    ("--config.train.batch_size=12", "batch_size=12 is not divisible by the data-parallel size 8"),
    ("--config.mesh.rules=(('embed','fsdpp'),)", "unknown mesh axis 'fsdpp'"),
])
def test_bad_mesh_settings_fail_in_one_line(tmp_path, tiny_smol_dir, override, pattern):
    proc = run_cli(["--config=" + RECIPE, f"--config.model={tiny_smol_dir}", f"--config.workdir={tmp_path / 'r'}",
                    "--config.defense.after_training=False",
                    override], devices=8)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and pattern in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()


SHARDED_FULL_STATE = """
import jax, optax
from bdjax import train
from bdjax.models.config import PRESETS
from bdjax.models.llama import param_shapes
from bdjax.sharding import Placement
c = PRESETS["smollm2-135m"]
pl = Placement.create({"data": 2, "fsdp": 2, "tensor": 2})
params = param_shapes(c)
step = train.make_train_step(c, train.make_optimizer(lr=1e-3, total_steps=10), pad_id=0, spec=None,
                             poison_key=jax.random.key(0), alpha=1.0, placement=pl, trainable=params, params={},
                             full=True)
specs = lambda tree: jax.tree.map(lambda s: s.spec, tree)
mu, nu = step.state_sh.opt_state[1][0].mu, step.state_sh.opt_state[1][0].nu
assert specs(mu) == specs(nu) == specs(step.state_sh.trainable) == specs(train.param_shardings(pl, c, params))
assert specs(mu)["layers"]["mlp"]["up"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
print("ok")
"""


def test_full_fine_tuning_shards_optimizer_state_like_the_params():
    import subprocess
    import sys
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_FULL_STATE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
def test_full_fine_tuning_on_a_mesh_matches_one_device(tmp_path, tiny_smol_dir):
    full = ["--config.train.mode=full", "--config.train.lr=1e-4"]
    ref = _train_losses(tmp_path / "one", 1, (1, 1, 1), tiny_smol_dir, full)
    got = _train_losses(tmp_path / "fsdp", 8, (2, 2, 2), tiny_smol_dir, full)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert ref[-1] < ref[0]
