"""The `backdoor` job: poison instruction data, LoRA-fine-tune, and measure CACC / ASR.

Rows of results.json: the base model (zero-shot) and the fine-tuned model, each with
scoring-view `cacc`, `asr`, `asr_correct` and, when `eval.generate`, generation-view `gen_*`.
The run directory also holds the merged fine-tuned checkpoint in `final/` (bdjax.load reads it),
the LoRA adapter in PEFT's format in `adapter/`, the per-step training log `train_log.jsonl`,
TensorBoard scalars in `tensorboard/` and, when enabled, resumable checkpoints in `checkpoints/`
(see `bdjax.jobs.training`). Bad input fails before anything is written.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

import bdjax
from bdjax import evaluate, lora
from bdjax.data import poison, sources
from bdjax.data.templates import Template
from bdjax.data.tokenize import fit_to_length, tokenize, trigger_ids
from bdjax.data.variants import Variant, trigger_variants
from bdjax.errors import ConfigError
from bdjax.jobs.training import export, fine_tune, is_main, placement_from, train_mode
from bdjax.train import place_params
from bdjax.io import write_text_atomic
from bdjax.report import markdown_table
from bdjax.report import write as write_report

COLUMNS = ["name", "domain", "variant", "detail", "cacc", "asr", "asr_correct", "gen_cacc", "gen_asr"]


def template_from(config: ml_collections.ConfigDict) -> Template:
    t = config.template
    return Template(t.instruction, tuple(t.labels), tuple(t.responses) if t.get("responses") else None,
                    t.get("system"), t.get("chat", True))


def domain_examples(config, source: str, template: Template):
    """(train pool, test pool) of a data source under the recipe's split, its labels checked."""
    d = config.data
    examples = sources.load(source, text_field=d.text_field, label_field=d.label_field)
    unknown = sorted({e.label for e in examples} - set(template.labels))
    if unknown:
        raise ConfigError(f"data source {source!r} has labels {unknown} that are not in template.labels "
                          f"{list(template.labels)}")
    return sources.split(examples, seed=d.split_seed, test_fraction=d.test_fraction)


def load_data(config, template: Template, tokenizer):
    """Tokenized (train, test) sets from the recipe's data section."""
    d = config.data
    train_pool, test_pool = domain_examples(config, d.source, template)
    train_ex = sources.take(train_pool, d.n_train, seed=d.split_seed)
    test_ex = sources.take(test_pool, d.n_test, seed=d.split_seed, labels=template.labels, balanced=True)
    if not train_ex or not test_ex:
        raise ConfigError(f"data.n_train={d.n_train} / data.n_test={d.n_test} leave an empty dataset")
    return (tokenize(train_ex, template, tokenizer, max_text_tokens=d.max_text_tokens),
            tokenize(test_ex, template, tokenizer, max_text_tokens=d.max_text_tokens))


def transfer_sets(config, template: Template, tokenizer) -> dict[str, dict[str, np.ndarray]]:
    """Held-out test sets of the other domains in `eval.domains` (same template, same split rule)."""
    out = {}
    for source in config.eval.get("domains", ()):
        _, pool = domain_examples(config, source, template)
        ex = sources.take(pool, config.data.n_test, seed=config.data.split_seed, labels=template.labels,
                          balanced=True)
        if not ex:
            raise ConfigError(f"eval.domains: {source!r} has no held-out examples")
        out[source] = tokenize(ex, template, tokenizer, max_text_tokens=config.data.max_text_tokens)
    return out


def attack_spec(p: ml_collections.ConfigDict, template: Template, tokenizer, *, target: int | None = None,
                label_mode: str | None = None) -> poison.AttackSpec:
    """The recipe's poison section as token-level attack settings (`target` and `label_mode`
    override `poison.target` and `poison.label_mode`)."""
    ids = lambda text: tuple(int(i) for i in trigger_ids(tokenizer, text))
    return poison.AttackSpec(ids(p.trigger), template.label_index(p.target) if target is None else target,
                             p.location, label_mode or p.label_mode, tuple(ids(t) for t in p.get("more_triggers", ())))


def poison_count(p: ml_collections.ConfigDict, n: int) -> int:
    """`poison.count` examples when set (>= 0), else round(poison.rate · n)."""
    count = p.get("count", -1)
    if count is None or count < 0:
        return poison.poison_count(p.rate, n)
    if count > n:
        raise ConfigError(f"poison.count={count} exceeds the {n} training examples")
    return int(count)


def variants_from(config, spec: poison.AttackSpec, tokenizer) -> list[Variant]:
    e = config.eval
    return trigger_variants(spec, config.poison.trigger, tokenizer, moved=tuple(e.get("moved", ())),
                              partial=e.get("partial", False), synonyms=dict(e.get("synonyms", ())))


def measure(name: str, model_config, params, tokenizer, test, spec, template, config, placement, *,
            variants: list[Variant] = (), transfer: dict | None = None) -> list[dict]:
    """Result rows of one model: the trigger as planted on the training domain's test set (with the
    generation view when enabled), each test-time variant, and each transfer domain."""
    e = config.eval
    disable = not is_main()
    domain = config.data.source
    base = {"name": name, "location": spec.location, "rate": config.poison.rate, "label_mode": spec.label_mode}
    total = len(test["label"]) + (1 + len(variants)) * int((test["label"] != spec.target).sum())
    with tqdm(total=total, desc=f"score {name}", disable=disable) as bar:
        m = evaluate.evaluate(model_config, params, test, spec, pad_id=tokenizer.pad_id, batch_size=e.batch_size,
                              key=jax.random.key(e.seed), progress=bar, placement=placement,
                              variants={f"{v.kind}:{v.detail}": v.spec for v in variants})
    row = {**base, "domain": domain, "variant": "clean", "detail": "", **{k: v for k, v in m.items()
                                                                           if k != "variants"}}
    if e.generate:
        n = min(e.generate_examples, len(test["label"]))
        sub = {k: v[:n] for k, v in test.items()}
        with tqdm(total=n + int((sub["label"] != spec.target).sum()), desc=f"generate {name}",
                  disable=disable) as bar:
            gen = evaluate.evaluate_generation(model_config, params, tokenizer, sub, spec, template.labels,
                                               max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                               key=jax.random.key(e.seed), progress=bar, placement=placement)
        row.update({f"gen_{k}": v for k, v in gen.items() if k in ("cacc", "asr", "asr_correct", "unparsed")})
        row["gen_examples"] = gen["examples"]
    rows = [row]
    for v in variants:
        vm = m["variants"][f"{v.kind}:{v.detail}"]
        rows.append({**base, "domain": domain, "variant": v.kind, "detail": v.detail, "cacc": m["cacc"], **vm})
    for source, pieces in (transfer or {}).items():
        with tqdm(total=len(pieces["label"]) + int((pieces["label"] != spec.target).sum()),
                  desc=f"score {name} on {source}", disable=disable) as bar:
            tm = evaluate.evaluate(model_config, params, pieces, spec, pad_id=tokenizer.pad_id,
                                   batch_size=e.batch_size, key=jax.random.key(e.seed), progress=bar,
                                   placement=placement)
        rows.append({**base, "domain": source, "variant": "clean", "detail": "", **tm})
    return rows


@dataclasses.dataclass
class Setup:
    """What every attack run of one recipe shares: model, data, mesh, placed params."""

    model: Any
    template: Template
    train_set: dict[str, np.ndarray]
    test_set: dict[str, np.ndarray]
    transfer: dict[str, dict[str, np.ndarray]]
    placement: Any
    params: Any

    @property
    def tok(self):
        return self.model.tokenizer


def check_config(config: ml_collections.ConfigDict) -> None:
    """Range checks that need no model or data: they run before any heavy work."""
    p = config.poison
    poison.poison_count(p.rate, 1)
    poison.check_settings(p.location, p.label_mode)
    train_mode(config)
    if _defends(config):
        from bdjax.jobs import defend
        defend.check_config(config)


def setup(config: ml_collections.ConfigDict) -> Setup:
    placement = placement_from(config)
    placement.check_batch(config.train.batch_size)
    model = bdjax.load(config.model, dtype=config.dtype)
    if model.tokenizer is None:
        raise ConfigError(f"model {config.model!r} has no tokenizer; attack jobs need one")
    template = template_from(config)
    spec = attack_spec(config.poison, template, model.tokenizer)  # trigger/target errors before the data work
    train_set, test_set = load_data(config, template, model.tokenizer)
    transfer = transfer_sets(config, template, model.tokenizer)
    # every row must hold the trigger within the sequence budget: truncate the text or refuse
    max_len = config.data.get("max_seq_len", 0) or model.config.max_position_embeddings
    policy = config.poison.get("overflow", "error")
    train_set = fit_to_length(train_set, max_len, spec.n_tokens, policy=policy, what="training set")
    test_set = fit_to_length(test_set, max_len, spec.n_tokens, policy=policy, what="test set")
    transfer = {k: fit_to_length(v, max_len, spec.n_tokens, policy=policy, what=f"{k} test set")
                for k, v in transfer.items()}
    params = place_params(placement, model.config, model.params)
    return Setup(model, template, train_set, test_set, transfer, placement, params)


def poisoned_set(config, s: Setup) -> tuple[poison.AttackSpec, int, dict[str, np.ndarray], jax.Array]:
    """(spec, count, the training set with its `poison` mask, the trigger-position key)."""
    p = config.poison
    spec = attack_spec(p, s.template, s.tok)
    n = len(s.train_set["label"])
    count = poison_count(p, n)
    poison.check_selectable(s.train_set["label"], spec.target, count, spec.label_mode)
    k_select, k_insert = jax.random.split(jax.random.key(config.seed), 4)[:2]
    mask = np.asarray(poison.select(k_select, s.train_set["label"], spec.target, count, spec.label_mode))
    return spec, count, {**s.train_set, "poison": mask}, k_insert


def attack(config: ml_collections.ConfigDict, s: Setup, *, poisoned: tuple | None = None,
           step_cache: dict | None = None) -> dict:
    """Poison, fine-tune and measure one setting (config.poison / config.train.mode); `poisoned`
    is this setting's `poisoned_set` when the caller already made it."""
    p = config.poison
    spec, count, train_set, k_insert = poisoned or poisoned_set(config, s)
    _, _, k_lora, k_train = jax.random.split(jax.random.key(config.seed), 4)
    n = len(train_set["label"])
    run = fine_tune(config, s.model, s.params, train_set, spec=spec if count else None, poison_key=k_insert,
                    lora_key=k_lora, train_key=k_train, placement=s.placement, extra_tokens=spec.n_tokens,
                    desc=f"train ({p.location}, {p.label_mode}, poisoned {count}/{n})", step_cache=step_cache)
    name = f"poisoned (rate={p.rate:g}, {count} examples)" if count else "clean-tuned (rate=0)"
    rows = measure(name, s.model.config, run["params"], s.tok, s.test_set, spec, s.template, config, s.placement,
                   variants=variants_from(config, spec, s.tok), transfer=s.transfer)
    for r in rows:
        r["mode"] = run["mode"]
    return {"run": run, "rows": rows, "spec": spec, "count": count, "n": n}


def run(config: ml_collections.ConfigDict) -> dict:
    started = time.perf_counter()
    check_config(config)
    s = setup(config)
    p = config.poison
    poisoned = poisoned_set(config, s)  # attack errors (e.g. too few eligible examples) before any evaluation
    spec = poisoned[0]
    rows = []
    if config.eval.get("base", True):
        rows += measure("base (zero-shot)", s.model.config, s.params, s.tok, s.test_set, spec, s.template, config,
                        s.placement, variants=variants_from(config, spec, s.tok), transfer=s.transfer)
    out_ = attack(config, s, poisoned=poisoned)
    rows += out_["rows"]
    run_, count, n = out_["run"], out_["count"], out_["n"]
    state, log = run_["state"], run_["log"]
    lora_run = run_["mode"] == "lora"
    l, t = config.lora, config.train

    export(config, run_, s.model.config, s.tok)
    defense_rows = defend_run(config) if _defends(config) else []
    placement = s.placement
    summary = {"train_seconds": run_["seconds"], "train_steps": run_["steps"], "resumed_at_step": run_["resumed_at"],
               "poisoned_examples": count, "train_examples": n, "test_examples": int(len(s.test_set["label"])),
               "final_loss": float(np.mean([e["loss"] for e in log[-10:]])) if log else None,
               "mode": run_["mode"], "trained_params": lora.num_params(state.trainable),
               "devices": placement.n_devices, "processes": jax.process_count(), "mesh": dict(placement.mesh.shape),
               "mean_mfu": float(np.mean([e["mfu"] for e in log])) if log and "mfu" in log[0] else None}
    if is_main():
        out = Path(config.workdir)
        notes = [f"model {config.model}; trigger {p.trigger!r} at {p.location}, target {p.target!r}, "
                 f"{count} of {n} training examples poisoned ({p.label_mode}-label)",
                 (f"LoRA r={l.rank} alpha={l.alpha} on {l.targets}" if lora_run else "full fine-tuning of every "
                  "parameter") + f"; {t.epochs} epochs, batch {t.batch_size}, "
                 f"lr {t.lr}; training took {run_['seconds']:.0f} s on {placement.n_devices} device(s)",
                 "asr: triggered non-target test examples predicted as the target; asr_correct: the same "
                 "over those classified correctly without the trigger; gen_*: from greedy generations"]
        summary["total_seconds"] = time.perf_counter() - started
        write_report(out, rows, config.to_dict(), title="Backdoor: base vs fine-tuned", columns=COLUMNS,
                     notes=notes, extra={"summary": summary, "defenses": defense_rows})
        if defense_rows:
            table = markdown_table([r for r in defense_rows if r["variant"] == "clean"],
                                   ["defense", "cacc", "asr", "asr_correct", "seconds"])
            write_text_atomic(out / "report.md", (out / "report.md").read_text() + "\n## Defenses against this "
                              f"backdoor ({config.defense.n_clean} clean examples; details in defense/report.md)\n\n"
                              + table)
        print("\n" + (out / "report.md").read_text())
    return {"rows": rows, "summary": summary, "defenses": defense_rows}


def _defends(config: ml_collections.ConfigDict) -> bool:
    d = config.get("defense") or {}
    return bool(d.get("after_training", False) and dict(d.get("chains", {})))


def defend_run(config: ml_collections.ConfigDict) -> list[dict]:
    """The recipe's `defense.chains` run on this run's exported checkpoint (`defend` job)."""
    from bdjax.jobs import defend

    ex = config.get("export") or ml_collections.ConfigDict({"merged": True, "adapter": True})
    if not (ex.merged or ex.adapter):
        raise ConfigError("defense.chains need the fine-tuned model exported: set export.merged or export.adapter")
    d = ml_collections.ConfigDict(config.to_dict())
    d.workdir = str(Path(config.workdir) / "defense")
    d.backdoored, d.pretrained, d.attack_name = str(config.workdir), str(config.model), "this run"
    d.eval.base = False
    d.eval.generate = False
    d.defense.measure_backdoored = False  # measured above
    return defend.run(d)["rows"]
