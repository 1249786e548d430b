"""Labelled text sources: the four bundled sentiment domains, local files, and hub datasets.

A source yields `Example(text, label)` with label a class name ("negative"/"positive" for the
bundled domains). Splits are fixed by `split_seed`, so the test set is the same for every run
that uses the same seed, whatever the run's own seed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from bdjax.errors import ConfigError

# Hutto & Gilbert (ICWSM 2014): tab-separated id, mean rating in [-4, 4], text; latin-1.
DOMAINS = {"movie": "movieReviewSnippets", "amazon": "amazonReviewSnippets", "tweets": "tweets",
           "nyt": "nytEditorialSnippets"}


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: str


def _bundled(domain: str) -> list[Example]:
    from bdjax.checkpoints.assets import sentiment_dir

    path = sentiment_dir() / f"{DOMAINS[domain]}_GroundTruth.txt"
    out = []
    for line in path.read_text(encoding="latin-1").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score, text = float(parts[1]), "\t".join(parts[2:]).strip()
        if score != 0 and text:  # zero-rated snippets are neither positive nor negative
            out.append(Example(text, "positive" if score > 0 else "negative"))
    return out


def _local(path: Path, text_field: str, label_field: str) -> list[Example]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        raw = path.read_text(encoding="utf-8")
        rows = json.loads(raw) if suffix == ".json" else [json.loads(l) for l in raw.splitlines() if l.strip()]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ConfigError(f"data file {path} must be .jsonl, .json, .csv, .tsv or .parquet")
    return _rows_to_examples(rows, text_field, label_field, str(path))


def _rows_to_examples(rows, text_field: str, label_field: str, where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        if text_field not in row or label_field not in row:
            raise ConfigError(f"{where}: row {i} lacks field {text_field!r} or {label_field!r} "
                              f"(it has {sorted(row)}); set data.text_field / data.label_field")
        out.append(Example(str(row[text_field]), str(row[label_field])))
    return out


def _hub(name: str, split: str, text_field: str, label_field: str, label_names) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data source {name!r} is not bundled or local, and the `datasets` package is not "
                          "installed for hub datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network and hub errors: one line for the user
        raise ConfigError(f"could not load hub dataset {name!r} split {split!r}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    rows = [dict(r) for r in ds]
    if label_names:  # integer class ids -> names
        rows = [{**r, label_field: label_names[int(r[label_field])]} for r in rows]
    return _rows_to_examples(rows, text_field, label_field, name)


def load(source: str, *, split: str = "train", text_field: str = "text", label_field: str = "label",
         label_names: tuple[str, ...] | None = None) -> list[Example]:
    """All examples of a source: a bundled domain name, a local file, or a hub dataset name."""
    if source in DOMAINS:
        examples = _bundled(source)
    elif Path(source).expanduser().is_file():
        examples = _local(Path(source).expanduser(), text_field, label_field)
    elif "/" in source and not Path(source).suffix:
        examples = _hub(source, split, text_field, label_field, label_names)
    else:
        raise ConfigError(f"data source {source!r} is neither a bundled domain {sorted(DOMAINS)}, an existing "
                          "file, nor a hub dataset name")
    if not examples:
        raise ConfigError(f"data source {source!r} holds no examples")
    return examples


def split(examples: list[Example], *, seed: int, test_fraction: float) -> tuple[list[Example], list[Example]]:
    """A fixed shuffle of the examples cut into (train pool, test pool)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction={test_fraction} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_test = int(round(len(examples) * test_fraction))
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


def take(examples: list[Example], n: int, *, seed: int, labels: tuple[str, ...] | None = None,
         balanced: bool = False) -> list[Example]:
    """n examples drawn without replacement (all if n < 0); `balanced` draws equally per label."""
    if n < 0 or n >= len(examples) and not balanced:
        return list(examples)
    rng = np.random.default_rng(seed)
    if not balanced:
        return [examples[i] for i in sorted(rng.choice(len(examples), n, replace=False))]
    labels = labels or tuple(sorted({e.label for e in examples}))
    per = n // len(labels)
    out = []
    for lab in labels:
        pool = [e for e in examples if e.label == lab]
        if len(pool) < per:
            raise ConfigError(f"only {len(pool)} examples of label {lab!r}; cannot draw {per} for a balanced set")
        out += [pool[i] for i in sorted(rng.choice(len(pool), per, replace=False))]
    return [out[i] for i in rng.permutation(len(out))]
