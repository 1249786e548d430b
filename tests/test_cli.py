"""Bad input gets one clear line on stderr and exit code 2, no traceback, and no partial output."""

import json
import shutil
import subprocess
import sys

import pytest

import gguf_files
from bdjax.main import cli
from conftest import repo_root

RECIPE = str(repo_root() / "recipes" / "generate.py")


def _run(capsys, tmp_path, *overrides):
    workdir = tmp_path / "run"
    code = cli([f"--config={RECIPE}", f"--config.workdir={workdir}", *overrides])
    err = capsys.readouterr().err.strip()
    return code, err, workdir


def _assert_clean_failure(code, err, workdir, pattern):
    import re

    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("bdjax: error: "), err
    assert re.search(pattern, err), err
    assert not workdir.exists()


def test_unknown_config_key(capsys, tmp_path):
    _assert_clean_failure(*_run(capsys, tmp_path, "--config.no_such_key=1"), "unknown config key.*no_such_key")


def test_missing_recipe(capsys, tmp_path):
    code = cli(["--config=recipes/does_not_exist.py"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does_not_exist.py" in err


def test_missing_checkpoint_dir(capsys, tmp_path):
    _assert_clean_failure(*_run(capsys, tmp_path, f"--config.model={tmp_path / 'absent'}"), "not found")


def test_pickle_checkpoint(capsys, tmp_path, hf_dirs):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(hf_dirs["llama"][0] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    _assert_clean_failure(*_run(capsys, tmp_path, f"--config.model={d}"), "never unpickles.*safetensors")


def test_config_disagreeing_with_tensors(capsys, tmp_path, hf_dirs):
    d = tmp_path / "mismatch"
    shutil.copytree(hf_dirs["qwen2"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_clean_failure(*_run(capsys, tmp_path, f"--config.model={d}"), "has shape .* but config.json implies")


def test_truncated_safetensors(capsys, tmp_path, hf_dirs):
    d = tmp_path / "truncated"
    shutil.copytree(hf_dirs["llama"][0], d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    _assert_clean_failure(*_run(capsys, tmp_path, f"--config.model={d}"), "is truncated")


@pytest.mark.parametrize("kind, pattern", [("arch", "architecture 'gpt2' is not supported"),
                                           ("quant", "quantization type IQ2_XXS")])
def test_unsupported_gguf(capsys, tmp_path, hf_dirs, kind, pattern):
    model = hf_dirs["llama"][1]
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    kw = {"arch": "gpt2"} if kind == "arch" else {"raw_type": "IQ2_XXS"}
    path = gguf_files.write(tmp_path / "m.gguf", model.config.to_dict(), state, **kw)
    _assert_clean_failure(*_run(capsys, tmp_path, f"--config.model={path}"), pattern)


def test_console_entry_points_report_errors_without_traceback(tmp_path):
    for cmd in ([sys.executable, "-m", "bdjax.main"], [shutil.which("bdjax") or "bdjax"]):
        proc = subprocess.run([*cmd, f"--config={RECIPE}", f"--config.model={tmp_path / 'x.pt'}",
                               f"--config.workdir={tmp_path / 'run'}"], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
        assert "never unpickles" in proc.stderr
    assert not (tmp_path / "run").exists()
