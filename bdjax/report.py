"""Run reports: results.json (rows of metrics plus the config) and a markdown table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bdjax.io import write_json_atomic, write_text_atomic


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def _json_safe(value: Any) -> Any:
    """NaN (an undefined rate, e.g. ASR over zero examples) becomes null: bare NaN is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write(workdir: str | Path, rows: list[dict], config: dict, *, title: str, columns: list[str],
          notes: list[str] = (), extra: dict | None = None) -> None:
    """results.json ({"rows": [...], "config": {...}, ...}) and report.md in `workdir`."""
    workdir = Path(workdir)
    write_json_atomic(workdir / "results.json",
                      _json_safe({"rows": rows, "config": config, **(extra or {})}))
    text = f"# {title}\n\n" + markdown_table(rows, columns)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text_atomic(workdir / "report.md", text)
