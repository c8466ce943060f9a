"""Tests for pipelines/progress.py: when a line is due and what it says."""

from __future__ import annotations

from pipelines.progress import Progress, format_duration


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_duration() -> None:
    assert format_duration(-1) == "0 s"
    assert format_duration(42.4) == "42 s"
    assert format_duration(129) == "2m09s"
    assert format_duration(3840) == "1h04m"


def test_time_based_lines_rate_from_the_first_item() -> None:
    clock, lines = Clock(), []
    progress = Progress("refine", 100, report=lines.append, clock=clock)
    clock.now += 20  # start-up: not in the rate
    progress.update(10)
    clock.now += 6
    progress.update(20)
    assert lines == []  # not due before 10 s after the first item
    clock.now += 4
    progress.update(30, "3/10 units")
    assert lines == [
        "refine: 30/100 images (30%), 2.00 images/s, 30 s elapsed, ETA 35 s; 3/10 units"
    ]
    clock.now += 1
    progress.update(40)
    assert len(lines) == 1  # 1 s after the last line
    clock.now += 1
    progress.update(100)  # the last item is always reported, without an ETA
    assert lines[-1] == "refine: 100/100 images (100%), 3.12 images/s, 32 s elapsed"


def test_a_burst_at_the_end_rates_the_whole_time() -> None:
    clock, lines = Clock(), []
    progress = Progress("pseudo_masks", 30, report=lines.append, clock=clock)
    clock.now += 16
    progress.update(1)
    clock.now += 0.2
    progress.update(30)
    assert lines == ["pseudo_masks: 30/30 images (100%), 1.85 images/s, 16 s elapsed"]


def test_a_single_update_rates_the_whole_time() -> None:
    clock, lines = Clock(), []
    progress = Progress("pseudo_masks", 30, report=lines.append, clock=clock)
    clock.now += 15
    progress.update(30)
    assert lines == ["pseudo_masks: 30/30 images (100%), 2.00 images/s, 15 s elapsed"]


def test_item_based_lines_and_a_resumed_start() -> None:
    clock, lines = Clock(), []
    progress = Progress(
        "train", 50, unit="iterations", report=lines.append, every_items=10, start=20, clock=clock
    )
    clock.now += 5
    progress.update(21)
    clock.now += 4.5
    progress.update(29)
    assert lines == []
    clock.now += 0.5
    progress.update(30, "loss 0.5000")
    assert lines == [
        "train: 30/50 iterations (60%), 1.80 iterations/s, 10 s elapsed, ETA 11 s; loss 0.5000"
    ]


def test_no_rate_yet_gives_an_unknown_eta() -> None:
    lines: list[str] = []
    progress = Progress("ingest", 5, report=lines.append, every_items=0, clock=Clock())
    progress.update(0)
    assert lines == ["ingest: 0/5 images (0%), 0.00 images/s, 0 s elapsed, ETA ?"]
