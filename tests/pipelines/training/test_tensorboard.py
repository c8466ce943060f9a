"""Event files of a metrics history (the `tensorboard` extra), and nothing without it."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import pytest

from pipelines.training.tensorboard import event_file

HISTORY = [
    {"iteration": 20, "loss": 3.0, "loss_seeding": 2.0, "lr": 1e-3, "images_per_s": 4.0},
    {"iteration": 40, "loss": 2.0, "loss_seeding": 1.5, "lr": 5e-4, "step_s": math.nan},
]


def test_event_file_holds_every_finite_scalar(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # in the test extra; the code itself runs without it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = event_file(HISTORY)
    assert written is not None
    name, data = written
    assert name.startswith("events.out.tfevents.")
    (tmp_path / name).write_bytes(data)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/loss", "loss/loss_seeding", "lr/lr", "speed/images_per_s"} <= tags
    assert "speed/step_s" not in tags  # NaN is not written
    assert [(e.step, e.value) for e in events.Scalars("loss/loss")] == [(20, 3.0), (40, 2.0)]
    assert event_file([]) is None


def test_without_the_extra_nothing_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name: str, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert event_file(HISTORY) is None
