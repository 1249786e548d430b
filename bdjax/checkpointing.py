"""Training checkpoints with orbax: LoRA params, optimizer state, step, PRNG key and data position.

Saves are asynchronous (training continues while the arrays are written), happen every
`every` steps and at the end, and keep the newest `keep`. A checkpoint becomes visible only once
it is completely written, so a process killed mid-save (even with SIGKILL) resumes from the
previous one. The settings that shape the run's trajectory are saved with each checkpoint:
resuming a different run from the same directory is refused, naming the settings that differ,
instead of silently mixing the two. Keys added to bdjax since the checkpoint was written match
while they hold their old behaviour (`config_diff.ADDED_KEYS`), so a run outlives an upgrade.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from bdjax import config_diff
from bdjax.errors import ConfigError
from bdjax.loop import Position
from bdjax.train import TrainState


def fingerprint(config: dict) -> str:
    """A hash of the settings that determine a training run's trajectory (all that checkpoints
    written before the settings themselves were saved carry)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_saveable(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng)}


class RunCheckpoints:
    """Checkpoints of one training run under `directory`."""

    def __init__(self, directory: str | Path, *, every: int, keep: int = 2, asynchronous: bool = True,
                 config: dict | None = None):
        if every < 1 or keep < 1:
            raise ConfigError(f"checkpoint.every={every} and checkpoint.keep={keep} must be at least 1")
        self.directory = Path(directory).absolute()
        self.config = json.loads(json.dumps(config or {}, sort_keys=True, default=str))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: TrainState) -> tuple[TrainState, Position] | None:
        """The latest checkpoint restored onto `like`'s shardings, or None when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if "config" in meta:
            differ = config_diff.differences(self.config, meta["config"])
            shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
            why = f"it differs from this recipe in {shown}"
        else:  # written before the settings were saved with it: only their hash to go on
            differ = meta.get("fingerprint") != fingerprint(self.config)
            why = "its settings differ from this recipe's"
        if differ:
            raise ConfigError(f"{self.directory} holds checkpoints of a different run ({why}); "
                              "choose another workdir or delete that one")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                _to_saveable(like))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        state = TrainState(restored["step"], restored["trainable"], restored["opt_state"],
                           jax.random.wrap_key_data(restored["rng"]))
        return state, Position(int(meta["epoch"]), int(meta["batch"]))

    def save(self, state: TrainState, position: Position, *, force: bool = False) -> bool:
        """Save if the step is due (every `every` steps) or `force`; returns whether it saved."""
        step = int(state.step)
        meta = {"step": step, "epoch": position.epoch, "batch": position.batch,
                "fingerprint": fingerprint(self.config), "config": self.config}
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

