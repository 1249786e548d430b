"""Training checkpoints know the settings they were written under: a run with other settings may
not resume from them (the error names what differs), while a key added to bdjax since they were
written matches as long as it keeps its old behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.checkpointing import RunCheckpoints
from bdjax.errors import ConfigError
from bdjax.loop import Position
from bdjax.train import TrainState

OLD = {"model": "m", "train": {"lr": 1e-3, "epochs": 2}}  # written before train.matmul_dtype existed


def _state(v):
    return TrainState(jnp.asarray(3, jnp.int32), {"a": jnp.full((4,), v)}, {"m": jnp.zeros((4,))},
                      jax.random.key(7))


def _save(directory, config):
    ck = RunCheckpoints(directory, every=1, asynchronous=False, config=config)
    ck.save(_state(2.5), Position(1, 5), force=True)
    ck.close()


def _restore(directory, config):
    ck = RunCheckpoints(directory, every=1, asynchronous=False, config=config)
    try:
        return ck.restore(_state(0.0))
    finally:
        ck.close()


def test_resume_checks_the_settings_by_name(tmp_path):
    _save(tmp_path, OLD)
    state, position = _restore(tmp_path, OLD)
    assert position == Position(1, 5) and int(state.step) == 3
    np.testing.assert_array_equal(state.trainable["a"], np.full((4,), 2.5))

    same_as_before = {"model": "m", "train": {"lr": 1e-3, "epochs": 2, "matmul_dtype": ""}}
    assert _restore(tmp_path, same_as_before)[1] == Position(1, 5)

    bf16 = {"model": "m", "train": {"lr": 1e-3, "epochs": 2, "matmul_dtype": "bfloat16"}}
    with pytest.raises(ConfigError, match=r"differs from this recipe in train.matmul_dtype\)"):
        _restore(tmp_path, bf16)
    with pytest.raises(ConfigError, match=r"differs from this recipe in train.epochs, train.lr\)"):
        _restore(tmp_path, {"model": "m", "train": {"lr": 1e-4, "epochs": 3}})
    with pytest.raises(ConfigError, match=r"in train.warmup\)"):  # a key not known to be added later
        _restore(tmp_path, {"model": "m", "train": {"lr": 1e-3, "epochs": 2, "warmup": 0}})


def test_checkpoints_from_before_the_settings_were_saved_still_resume(tmp_path):
    """Older checkpoints carry only a hash of the settings: the same settings resume, others not."""
    import orbax.checkpoint as ocp

    from bdjax.checkpointing import _to_saveable, fingerprint

    ck = RunCheckpoints(tmp_path, every=1, asynchronous=False, config=OLD)
    meta = {"step": 3, "epoch": 0, "batch": 2, "fingerprint": fingerprint(OLD)}
    ck.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(_state(1.5))),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    ck.close()
    assert _restore(tmp_path, OLD)[1] == Position(0, 2)
    with pytest.raises(ConfigError, match="different run"):
        _restore(tmp_path, {"model": "m", "train": {"lr": 1e-4, "epochs": 2}})
