"""The `defend` job: run defense chains on a backdoored checkpoint and measure what they removed.

Inputs: `config.backdoored` (an HF safetensors directory, a .gguf file, or a bdjax run directory —
its merged `final/`, or its PEFT `adapter/` applied to `config.pretrained`), `config.pretrained`
(the model before the attack) and `config.defense.chains` ({name: (entry, ...)}, entries as in
`bdjax.defenses.registry`). Clean defense data: `defense.n_clean` examples of the training pool
that the attack's fine-tune did not draw (same split and seed as the attack recipe). Evaluation
uses the attack recipe's template, test set and (known) trigger — the defenses never see it.

Outputs in `config.workdir`: `cleaned/<chain>/` (HF safetensors, when `defense.export`),
`results.json` / `report.md` (rows: `defense`, `attack`, `cacc`, `asr`, ...) and
`asr_vs_cacc.png`. Against a generative backdoor (a recipe with `poison.marker`, as
`recipes/generative.py`), the clean defense and test responses are the pretrained model's own
greedy replies, the rows carry `marker_rate`, `marker_rate_clean` and `ppl` instead, and the plot
is `marker_vs_ppl.png`. Chains made only of elementwise transforms run streamed over the checkpoint
files when both are HF directories (`defense.stream`). Bad input fails before anything is written.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from bdjax import plots
from bdjax.checkpoints import NAMED, load_checkpoint, save_hf_dir
from bdjax.checkpoints.peft import load_peft_adapter
from bdjax.data import sources
from bdjax.data.tokenize import fit_to_length, tokenize
from bdjax.defenses import registry
from bdjax.defenses.base import as_numpy, check_compatible
from bdjax.errors import CheckpointError, ConfigError
from bdjax.jobs.backdoor import attack_spec, domain_examples, load_data, measure, template_from
from bdjax.jobs.training import is_main, placement_from
from bdjax.train import place_params
from bdjax.lora import merge
from bdjax.report import write as write_report

COLUMNS = ["defense", "attack", "variant", "cacc", "asr", "asr_correct", "seconds"]
GENERATIVE_COLUMNS = ["defense", "attack", "marker_rate", "marker_rate_clean", "ppl", "seconds"]


def resolve(spec: str | Path) -> tuple[Path | None, Path | None]:
    """(an HF directory or .gguf to load, a PEFT adapter directory to apply to the pretrained model)."""
    name = str(spec)
    if name in NAMED:
        return NAMED[name](), None
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "final" / "config.json").exists():
            return path / "final", None
        if (path / "adapter" / "adapter_config.json").exists():
            return None, path / "adapter"
        if (path / "adapter_config.json").exists():
            return None, path
    if not path.exists():
        raise CheckpointError(f"backdoored checkpoint {name!r} not found: pass an HF safetensors directory, a "
                              ".gguf file, or a bdjax run directory (with final/ or adapter/)")
    return path, None


def load_pair(config: ml_collections.ConfigDict):
    """(model config, backdoored params, pretrained params, tokenizer, backdoored HF dir or None, pretrained HF dir
    or None), checked to be one architecture."""
    pre_path, _ = resolve(config.pretrained)
    pre_config, pre_params, tok = load_checkpoint(pre_path)
    bd_path, adapter = resolve(config.backdoored)
    if adapter is not None:
        lora, alpha = load_peft_adapter(adapter, pre_config)
        bd_params = as_numpy(merge(pre_params, lora, alpha=alpha))
    else:
        _, bd_params, bd_tok = load_checkpoint(bd_path)
        tok = tok or bd_tok
    check_compatible(bd_params, pre_params)  # architecture and vocabulary
    if tok is None:
        raise ConfigError("neither checkpoint has a tokenizer; the defend job needs one for data and evaluation")
    hf = lambda p: p if p is not None and p.is_dir() else None
    return pre_config, bd_params, pre_params, tok, hf(bd_path), hf(pre_path)


def defense_set(config: ml_collections.ConfigDict, template, tok) -> dict[str, np.ndarray]:
    """`defense.n_clean` clean examples from the training pool, disjoint from the attack's draw."""
    d = config.data
    pool, _ = domain_examples(config, d.source, template)
    return tokenize(unused_examples(config, pool, sources.take(pool, d.n_train, seed=d.split_seed)), template, tok,
                    max_text_tokens=d.max_text_tokens)


def unused_examples(config: ml_collections.ConfigDict, pool: list, drawn: list) -> list:
    """`defense.n_clean` examples of the training `pool` outside the attack's `drawn` ones."""
    n = config.defense.n_clean
    used = {id(e) for e in drawn}
    rest = [e for e in pool if id(e) not in used]
    if n < 1 or n > len(rest):
        raise ConfigError(f"defense.n_clean={n} must be between 1 and the {len(rest)} training-pool examples the "
                          "attack did not use")
    return sources.take(rest, n, seed=config.defense.seed)


@dataclasses.dataclass
class Task:
    """What the defenses are measured on: the clean defense set, the test set, how one model is
    measured, the answers' names (for defenses given a target answer) and the report's shape."""

    defense_set: dict[str, np.ndarray]
    test_set: dict[str, np.ndarray]
    measure: Callable[[str, Any], list[dict]]
    labels: tuple[str, ...]
    columns: list[str]
    plot: tuple[str, str, str, str]  # file name, x column, y column, y label


def classification_task(config, model_config, pre_params, tok, placement) -> Task:
    template = template_from(config)
    spec = attack_spec(config.poison, template, tok)
    _, test_set = load_data(config, template, tok)
    max_len = config.data.get("max_seq_len", 0) or model_config.max_position_embeddings
    test_set = fit_to_length(test_set, max_len, spec.n_tokens, policy=config.poison.get("overflow", "error"),
                             what="test set")
    m = lambda name, params: measure(name, model_config, params, tok, test_set, spec, template, config, placement)
    return Task(defense_set(config, template, tok), test_set, m, template.labels, COLUMNS,
                ("asr_vs_cacc.png", "cacc", "asr", "attack success (ASR)"))


def generative_task(config, model_config, pre_params, tok, placement) -> Task:
    from bdjax.jobs import generative

    template, spec, marker_ids = generative.setup(config, tok)
    pool, train_ex, test_ex = generative.examples(config)
    defense_ex = unused_examples(config, pool, train_ex)
    placed = place_params(placement, model_config, pre_params)
    build = lambda ex, what: generative.build(config, ex, template, model_config, placed, tok, marker_ids,
                                              placement, f"clean responses ({what})")
    defense = build(defense_ex, "defense")
    test_set = build(test_ex, "test")
    m = lambda name, params: [generative.measure(name, model_config, params, tok, test_set, spec, config, placement)]
    return Task(defense, test_set, m, generative.LABELS, GENERATIVE_COLUMNS,
                ("marker_vs_ppl.png", "ppl", "marker_rate", "marker rate on triggered prompts"))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def check_config(config: ml_collections.ConfigDict) -> None:
    chains = dict(config.defense.chains)
    if not chains:
        raise ConfigError("defense.chains is empty: name at least one chain, e.g. {'mix': ({'name': 'fine_mix'},)}")
    for entries in chains.values():
        registry.validate([dict(e) for e in entries])


def run(config: ml_collections.ConfigDict) -> dict:
    started = time.perf_counter()
    check_config(config)
    placement = placement_from(config)
    model_config, bd_params, pre_params, tok, bd_dir, pre_dir = load_pair(config)
    generative = bool(config.poison.get("marker", ""))
    task = (generative_task if generative else classification_task)(config, model_config, pre_params, tok,
                                                                     placement)
    ctx = registry.Context(model_config, task.defense_set, tok.pad_id, placement, tok, task.labels)
    chains = {name: [dict(e) for e in entries] for name, entries in dict(config.defense.chains).items()}
    built = {name: registry.build(entries, ctx) for name, entries in chains.items()}  # errors before any output
    attack = config.get("attack_name") or str(config.backdoored)
    out = Path(config.workdir)
    key = jax.random.key(config.seed)

    def rows_of(defense: str, params, seconds: float = 0.0, **extra) -> list[dict]:
        rows = task.measure(defense, params)
        return [{**r, "defense": defense, "attack": attack, "seconds": seconds, **extra} for r in rows]

    rows = []
    if config.eval.get("base", True):
        rows += rows_of("none (pretrained)", pre_params)
    ex = config.defense
    if ex.get("measure_backdoored", True):
        rows += rows_of("none (backdoored)", bd_params)
    for name, chain in built.items():
        begin = time.perf_counter()
        target = out / "cleaned" / name
        if ex.stream and chain.elementwise and bd_dir is not None and pre_dir is not None:
            from bdjax.checkpoints.stream import stream_defense
            if is_main():
                stream_defense(chain.transforms, bd_dir, pre_dir, target, jax.random.fold_in(key, 0))
            _barrier(f"streamed {name}")  # every process reads what process 0 wrote
            _, cleaned, _ = load_checkpoint(target, with_tokenizer=False)
            _barrier(f"loaded {name}")
            if not ex.export and is_main():
                shutil.rmtree(target)
                if not any(target.parent.iterdir()):
                    target.parent.rmdir()  # no empty cleaned/ left behind
            how = "streamed"
        else:
            cleaned = as_numpy(chain(bd_params, pretrained=pre_params, key=jax.random.fold_in(key, 0)))
            if ex.export and is_main():
                save_hf_dir(target, model_config, cleaned, tok)
            how = "in memory"
        seconds = time.perf_counter() - begin
        rows += rows_of(name, cleaned, seconds, chain=registry.describe(chains[name]), how=how)

    summary = {"defense_examples": int(len(ctx.data["label"])), "test_examples": int(len(task.test_set["label"])),
               "total_seconds": time.perf_counter() - started}
    if is_main():
        main_rows = [r for r in rows if generative or (r["variant"] == "clean" and r["domain"] == config.data.source)]
        name, x, y, ylabel = task.plot
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in main_rows:
            groups.setdefault(r["defense"], []).append((r[x], r[y]))
        xlabel = "clean-response perplexity" if generative else "clean accuracy (CACC)"
        plots.scatter(out / name, groups, xlabel=xlabel, ylabel=ylabel, title=f"defenses against {attack}")
        wanted = f"marker {config.poison.marker!r}" if generative else f"target {config.poison.target!r}"
        notes = [f"backdoored: {config.backdoored}; pretrained: {config.pretrained}; trigger {config.poison.trigger!r} "
                 f"(known to the evaluation only), {wanted}",
                 f"clean defense data: {summary['defense_examples']} {config.data.source} examples the attack did not "
                 "train on"] + [f"{n}: {registry.describe(e)}" for n, e in chains.items()] + ctx.notes
        write_report(out, rows, config.to_dict(), title="Defenses: backdoored vs cleaned", columns=task.columns,
                     notes=notes, extra={"summary": summary})
        print("\n" + (out / "report.md").read_text())
    return {"rows": rows, "summary": summary}
