"""TensorBoard segments of a metrics history (the `tensorboard` extra), and nothing without it."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import pytest

from pipelines.io.storage import resolve
from pipelines.training.tensorboard import (
    event_file,
    prune_segments,
    segment_name,
    segments,
    write_segment,
)

HISTORY = [
    {"iteration": 20, "loss": 3.0, "loss_seeding": 2.0, "lr": 1e-3, "images_per_s": 4.0},
    {"iteration": 40, "loss": 2.0, "loss_seeding": 1.5, "lr": 5e-4, "step_s": math.nan},
    {"iteration": 60, "loss": 1.0, "loss_seeding": 1.0, "lr": 1e-4},
]


def scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` over every event file in `directory`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_event_file_holds_every_finite_scalar(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # in the test extra; the code itself runs without it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = event_file(HISTORY[:2])
    assert data is not None
    (tmp_path / segment_name(40)).write_bytes(data)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/loss", "loss/loss_seeding", "lr/lr", "speed/images_per_s"} <= tags
    assert "speed/step_s" not in tags  # NaN is not written
    assert scalars(tmp_path, "loss/loss") == [(20, 3.0), (40, 2.0)]
    assert event_file([]) is None


def test_segments_cover_each_iteration_once_across_a_restart(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    directory = resolve(str(tmp_path / "tensorboard"))
    assert segments(directory) == {} and prune_segments(directory, after=0) == []
    assert write_segment(directory, HISTORY, after=0, last=20)
    assert write_segment(directory, HISTORY, after=20, last=40)  # past the checkpoint at 20
    assert not write_segment(directory, HISTORY, after=60, last=80)  # no row there
    assert list(segments(directory)) == [segment_name(20), segment_name(40)]
    assert segment_name(20) < segment_name(100)  # names sort in training order
    # A restart from the checkpoint at 20 logs 40 again: the old segment goes first.
    assert prune_segments(directory, after=20) == [segment_name(40)]
    assert write_segment(directory, HISTORY, after=20, last=60)
    (tmp_path / "tensorboard" / "notes.txt").write_text("not ours")
    assert list(segments(directory)) == [segment_name(20), segment_name(60)]
    assert all(size > 0 for size in segments(directory).values())
    assert scalars(tmp_path / "tensorboard", "loss/loss") == [(20, 3.0), (40, 2.0), (60, 1.0)]


def test_without_the_extra_nothing_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name: str, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert event_file(HISTORY) is None
    directory = resolve(str(tmp_path / "tensorboard"))
    assert not write_segment(directory, HISTORY, after=0, last=60)
    assert segments(directory) == {}
