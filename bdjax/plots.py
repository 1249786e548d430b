"""PNG figures for study reports (matplotlib, headless)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    """Write beside the target and rename: a figure appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finish(plt, fig, ax, path: str | Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def lines(path: str | Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, title: str,
          logx: bool = False) -> Path:
    """One line per series of (x, y) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(-0.02, 1.02))
    return _finish(plt, fig, ax, path)


def scatter(path: str | Path, groups: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str,
            title: str) -> Path:
    """One marker style per group of (x, y) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(groups.items()):
        ax.scatter([x for x, _ in points], [y for _, y in points], label=name, s=28)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    return _finish(plt, fig, ax, path)
