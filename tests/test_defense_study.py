"""The defense study on a tiny model: attacks trained once, every applicable chain run, one table."""

import json

import pytest

from bdjax.errors import ConfigError
from bdjax.main import cli
from conftest import repo_root

RECIPE = str(repo_root() / "recipes" / "defense_study.py")


def test_small_defense_study(tmp_path, tiny_smol_dir, capsys):
    from bdjax.jobs import defense_study
    from bdjax.main import parse_all

    workdir = tmp_path / "study"
    config, _, _ = parse_all([f"--config={RECIPE}", f"--config.model={tiny_smol_dir}",
                              f"--config.pretrained={tiny_smol_dir}", f"--config.workdir={workdir}",
                              "--config.data.n_train=64", "--config.data.n_test=16", "--config.defense.n_clean=16",
                              "--config.train.epochs=1", "--config.eval.generate=False"])
    quick = {"name": "retune", "epochs": 1, "batch_size": 8}
    config.defense.chains = {"mix": ({"name": "fine_mix", "keep": 0.5},),
                             "e_pur": ({"name": "purify_embeddings", "top_k": 8}, quick)}
    config.study.only = {"e_pur": ("full",)}
    config.study.attacks = {k: v for k, v in config.study.attacks.items() if k != "generative"}  # its own test
    out = defense_study.run(config)
    pairs = [(r["attack"], r["defense"]) for r in out["rows"]]
    # attacks and chains in ConfigDict (sorted) order; E-PUR only against the full fine-tune
    assert pairs == [("full", "none (pretrained)"), ("full", "none (backdoored)"), ("full", "e_pur"), ("full", "mix"),
                     ("full", pairs[4][1]), ("lora", "none (backdoored)"), ("lora", "mix"), ("lora", pairs[7][1])]
    assert pairs[4][1].startswith("word_frequency") and out["rows"][4]["variant"] == "detection"
    results = json.loads((workdir / "results.json").read_text())
    assert all({"defense", "attack", "cacc", "asr"} <= r.keys() for r in results["rows"] if r["variant"] == "clean")
    assert (workdir / "asr_vs_cacc.png").exists() and (workdir / "attacks" / "full" / "final").is_dir()
    # a rerun reuses the trained attacks
    mtime = (workdir / "attacks" / "lora" / "results.json").stat().st_mtime
    assert cli([f"--config={RECIPE}", f"--config.model={tiny_smol_dir}", f"--config.pretrained={tiny_smol_dir}",
                f"--config.workdir={workdir}", "--config.data.n_train=64", "--config.data.n_test=16",
                "--config.defense.n_clean=16", "--config.eval.generate=False",
                "--config.defense.chains.retune=({'name': 'prune'},)"]) == 2
    assert "'prune' is not in the registry" in capsys.readouterr().err
    assert (workdir / "attacks" / "lora" / "results.json").stat().st_mtime == mtime


def test_defense_study_with_a_generative_attack(tmp_path, tiny_smol_dir):
    from bdjax.jobs import defense_study
    from bdjax.main import parse_all

    workdir = tmp_path / "study"
    config, _, _ = parse_all([f"--config={RECIPE}", f"--config.model={tiny_smol_dir}",
                              f"--config.pretrained={tiny_smol_dir}", f"--config.workdir={workdir}"])
    gen = config.study.recipes.generative
    gen.data.n_train, gen.data.n_test, gen.defense.n_clean = 32, 8, 8
    gen.data.max_response_tokens, gen.eval.max_new_tokens, gen.train.epochs = 4, 4, 1
    config.study.attacks = {"generative": (("recipe", "generative"),)}
    config.defense.chains = {"osft_marker": ({"name": "osft", "trigger": "cf", "epochs": 1},),
                             "sande": ({"name": "sande", "target": "positive"},)}
    config.study.only = {"sande": ("lora",)}
    out = defense_study.run(config)
    assert [r["defense"] for r in out["rows"]] == ["none (pretrained)", "none (backdoored)", "osft_marker"]
    assert all({"marker_rate", "marker_rate_clean", "ppl"} <= r.keys() for r in out["rows"])
    assert (workdir / "marker_vs_ppl.png").stat().st_size > 0 and not (workdir / "asr_vs_cacc.png").exists()
    assert (workdir / "attacks" / "generative" / "final" / "config.json").exists()
    config.study.attacks = {"generative": (("recipe", "nope"),)}
    with pytest.raises(ConfigError, match="'nope' is not in study.recipes"):
        defense_study.run(config)
