"""The defend job on a tiny model with the real tokenizer: bad input fails in one line with no
output; a run writes cleaned checkpoints (streamed for elementwise chains) and a report."""

import json

import jax
import numpy as np
import pytest

from bdjax.checkpoints import load_hf_dir, save_hf_dir
from bdjax.main import cli
from conftest import repo_root

RECIPE = str(repo_root() / "recipes" / "defend.py")


@pytest.fixture(scope="module")
def backdoored_dir(tiny_smol_dir, tmp_path_factory):
    config, params, tok = load_hf_dir(tiny_smol_dir)
    noise = np.random.default_rng(0)
    moved = jax.tree.map(lambda x: (x + 0.05 * noise.standard_normal(x.shape)).astype(x.dtype), params)
    path = tmp_path_factory.mktemp("bd") / "model"
    save_hf_dir(path, config, moved, tok)
    return path


def _args(tiny, bd, workdir, *extra):
    return [f"--config={RECIPE}", f"--config.pretrained={tiny}", f"--config.backdoored={bd}",
            f"--config.workdir={workdir}", "--config.data.n_train=64", "--config.data.n_test=16",
            "--config.defense.n_clean=16", "--config.eval.base=False", *extra]


@pytest.mark.parametrize("extra, pattern", [
    (["--config.defense.chains.retune=({'name': 'prune'},)"], "'prune' is not in the registry"),
    (["--config.defense.chains.retune=({'name': 'retune', 'ratio': 2},)"], "has no setting"),
    (["--config.defense.n_clean=0"], "defense.n_clean=0 must be between 1"),
])
def test_bad_defense_config_fails_in_one_line(capsys, tmp_path, tiny_smol_dir, backdoored_dir, extra, pattern):
    workdir = tmp_path / "run"
    code = cli(_args(tiny_smol_dir, backdoored_dir, workdir, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and pattern in err, err
    assert not workdir.exists()


def test_mismatched_checkpoints_fail_in_one_line(capsys, tmp_path, tiny_smol_dir, backdoored_dir):
    config, params, tok = load_hf_dir(backdoored_dir)
    import dataclasses

    other = dataclasses.replace(config, intermediate_size=config.intermediate_size * 2)
    from bdjax.models.llama import init_params
    save_hf_dir(tmp_path / "other", other, jax.device_get(init_params(other, jax.random.key(0))), tok)
    workdir = tmp_path / "run"
    code = cli(_args(tiny_smol_dir, tmp_path / "other", workdir))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not the same architecture" in err, err
    assert not workdir.exists()
    code = cli(_args(tiny_smol_dir, tmp_path / "missing", workdir))
    assert code == 2 and "not found" in capsys.readouterr().err and not workdir.exists()


def test_defend_run_writes_cleaned_checkpoints_and_report(tmp_path, tiny_smol_dir, backdoored_dir):
    from ml_collections import config_flags  # noqa: F401  (the recipe loader)

    from bdjax.jobs import defend
    from bdjax.main import parse_all

    workdir = tmp_path / "run"
    config, _, _ = parse_all(_args(tiny_smol_dir, backdoored_dir, workdir))
    config.defense.chains = {
        "mix": ({"name": "fine_mix", "keep": 0.5, "mode": "selected"},),
        "mix_retune": ({"name": "fine_mix", "keep": 0.5}, {"name": "retune", "epochs": 1, "batch_size": 8}),
        "search": ({"name": "fine_mix_search", "keeps": (0.5,), "refit": False, "epochs": 1, "batch_size": 8},),
    }
    out = defend.run(config)
    rows = [r for r in out["rows"] if r["variant"] == "clean"]
    assert [r["defense"] for r in rows] == ["none (backdoored)", "mix", "mix_retune", "search"]
    assert {r["how"] for r in rows[1:]} == {"streamed", "in memory"}
    # what the ρ search tried and chose is in the report
    assert "fine_mix_search: held-out clean accuracy on" in (workdir / "report.md").read_text()
    results = json.loads((workdir / "results.json").read_text())
    assert all({"defense", "attack", "cacc", "asr"} <= r.keys() for r in results["rows"])
    assert (workdir / "report.md").exists() and (workdir / "asr_vs_cacc.png").stat().st_size > 0
    _, bd, _ = load_hf_dir(backdoored_dir)
    _, pre, _ = load_hf_dir(tiny_smol_dir)
    _, mixed, tok = load_hf_dir(workdir / "cleaned" / "mix")
    assert tok is not None  # the tokenizer travels with the streamed checkpoint
    k = mixed["layers"]["mlp"]["up"]["kernel"]
    b, p = bd["layers"]["mlp"]["up"]["kernel"], pre["layers"]["mlp"]["up"]["kernel"]
    assert np.all((k == b) | (k == p)) and 0.4 < np.mean(k == b) < 0.6
    assert (workdir / "cleaned" / "mix_retune" / "config.json").exists()


def test_defend_a_generative_backdoor_reports_marker_rates(tmp_path, tiny_smol_dir, backdoored_dir):
    from bdjax.jobs import defend
    from bdjax.main import parse_all

    recipe = str(repo_root() / "recipes" / "defend_generative.py")
    workdir = tmp_path / "run"
    config, _, _ = parse_all([f"--config={recipe}", f"--config.pretrained={tiny_smol_dir}",
                              f"--config.backdoored={backdoored_dir}", f"--config.workdir={workdir}",
                              "--config.data.n_train=32", "--config.data.n_test=8", "--config.defense.n_clean=8",
                              "--config.data.max_response_tokens=4", "--config.eval.max_new_tokens=4",
                              "--config.eval.base=False"])
    fast = dict(epochs=1, batch_size=8, remat="none")
    config.defense.chains = {
        "osft": ({"name": "osft", "trigger": "cf", **fast},),
        "sande": ({"name": "sande", "target": "marked", "parrot_epochs": 2, "parrot_tokens": 2, **fast},),
    }
    out = defend.run(config)
    assert [r["defense"] for r in out["rows"]] == ["none (backdoored)", "osft", "sande"]
    for r in out["rows"]:
        assert 0.0 <= r["marker_rate"] <= 1.0 and 0.0 <= r["marker_rate_clean"] <= 1.0 and r["ppl"] > 1.0
    assert (workdir / "marker_vs_ppl.png").stat().st_size > 0
    assert "marker_rate" in (workdir / "report.md").read_text()
    # a SANDE entry naming an answer the task does not have is a config error before any output
    config.defense.chains = {"sande": ({"name": "sande", "target": "positive"},)}
    config.workdir = str(tmp_path / "bad")
    with pytest.raises(Exception, match="sande target 'positive' is not one of the answers"):
        defend.run(config)
    assert not (tmp_path / "bad").exists()
