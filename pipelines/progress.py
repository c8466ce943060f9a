"""A long stage's progress lines: items done of the total, rate and ETA, one every few seconds.

Every stage that works through many items (refine's and pseudo masks' images, ingest's chunks,
training iterations) reports through one `Progress`, so that a log read during a run (`ray job
submit`, CI) says the same thing the same way:

    refine: 480/2000 images (24%), 11.8 images/s, 41 s elapsed, ETA 2m09s
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EVERY_S = 10.0  # seconds between two lines when no item count is asked for


def format_duration(seconds: float) -> str:
    """`42 s`, `2m09s`, `1h04m`: a duration at the precision a reader needs."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class Progress:
    """Progress of `total` items of one stage, reported to `report`.

    A line is due when the last item is done and otherwise every `every_items` items when set
    (`--progress-every N`) or else every `every_s` seconds from the first item; `update` is
    cheap when none is due. On the way the rate (and so the ETA) counts from the first item
    done, so that start-up (workers, the model, the first block) does not stretch the ETA; the
    last line's rate is over the whole time, like `elapsed`.
    """

    stage: str
    total: int
    unit: str = "images"
    report: Callable[[str], Any] = print
    every_items: int | None = None
    every_s: float = EVERY_S
    start: int = 0  # items done before this run (a resumed stage)
    clock: Callable[[], float] = time.monotonic
    _started: float = field(init=False)
    _last_at: float = field(init=False)
    _last_done: int = field(init=False, default=0)
    _first: tuple[float, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._started = self._last_at = self.clock()
        self._last_done = self.start

    def update(self, done: int, detail: str = "") -> None:
        """Reports `done` items (with an optional `detail`) when a line is due."""
        now = self.clock()
        if self._first is None:
            self._first = (now, done)
            self._last_at = now
        if done < self.total:
            if self.every_items is not None:
                if done - self._last_done < self.every_items:
                    return
            elif now - self._last_at < self.every_s:
                return
        self._last_at, self._last_done = now, done
        first_at, first_done = self._first
        if done < self.total and now - first_at >= 1.0 and done > first_done:
            rate = (done - first_done) / (now - first_at)
        else:  # the last line, or nothing to go on since the first item: the whole time
            rate = (done - self.start) / (now - self._started) if now > self._started else 0.0
        self.report(self.line(done, now - self._started, rate, detail))

    def line(self, done: int, elapsed: float, rate: float, detail: str = "") -> str:
        """The line for `done` items after `elapsed` seconds at `rate` items per second."""
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        text = f"{self.stage}: {done}/{self.total} {self.unit}{share}"
        text += f", {rate:.2f} {self.unit}/s, {format_duration(elapsed)} elapsed"
        if done < self.total:
            text += f", ETA {format_duration((self.total - done) / rate) if rate else '?'}"
        return text + (f"; {detail}" if detail else "")
