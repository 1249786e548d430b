"""Training metrics: one JSON line per step (`train_log.jsonl` in runs) and TensorBoard scalars.

Only the main process writes. A resumed run first drops the lines past its checkpoint's step,
so the file always describes one trajectory.
"""

from __future__ import annotations

import json
from pathlib import Path

from bdjax.tensorboard import SummaryWriter

SCALARS = ("loss", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "step_s", "lr")


class MetricsLog:
    def __init__(self, directory: str | Path, *, resume_step: int = 0, enabled: bool = True,
                 name: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(directory) / name
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(Path(directory) / "tensorboard")

    def write(self, entry: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self._tb.scalars(int(entry["step"]), {k: entry[k] for k in SCALARS if k in entry})

    def entries(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
