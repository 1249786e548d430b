"""Training metrics: JSONL lines and TensorBoard scalars (read back by TensorBoard itself)."""

import json

from bdjax.metrics import MetricsLog
from bdjax.tensorboard import crc32c


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_metrics_reach_jsonl_and_tensorboard_and_a_resume_drops_later_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step, "mfu": 0.5, "tokens_per_s": 100.0 * step, "width": 32})
    log.close()
    resumed = MetricsLog(tmp_path, resume_step=3)
    resumed.write({"step": 4, "loss": 0.2, "mfu": 0.5, "tokens_per_s": 1.0})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3, 4] and lines[-1]["loss"] == 0.2

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "mfu", "tokens_per_s"} <= set(events.Tags()["scalars"])
    loss = [(e.step, round(e.value, 6)) for e in events.Scalars("loss")]
    assert loss[:5] == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6)), (4, 0.25), (5, 0.2)]


def test_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "x", enabled=False)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "x").exists()
