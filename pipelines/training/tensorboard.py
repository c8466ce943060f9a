"""TensorBoard event files of a training stage's logged rows, written while it trains, when the
optional `tensorboard` extra is installed (`pip install -e '.[tensorboard]'`); nothing otherwise.

Rank 0 writes one event file ("segment") of the rows logged since the last one at every
checkpoint report, and at a logged row once `SEGMENT_SECONDS` have passed, to
`<stage output>/tensorboard/` on any store (local or S3): `tensorboard --logdir <output>` shows
the run while it trains, every scalar under `loss/`, `lr/`, `speed/` and `other/`
(docs/CONTRACTS.md). A segment is named by its last iteration (`segment_name`), so names sort in
training order and TensorBoard reads them one after the other. A worker restarted from a
checkpoint at iteration N first deletes the segments past N (`prune_segments`): their rows are
logged again, so every iteration is in exactly one segment. The commit lists the segments.
"""

from __future__ import annotations

import glob
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.io.storage import Location, retry_io, write_bytes_atomic

TENSORBOARD_DIR = "tensorboard"
SEGMENT_SECONDS = 60.0  # a segment at a logged row once this long has passed since the last one
_SEGMENT = re.compile(r"events\.out\.tfevents\.(\d{10})\.weakclip")


def segment_name(last_iteration: int) -> str:
    """The file name of the segment whose last row is at `last_iteration` (sorts in order)."""
    return f"events.out.tfevents.{last_iteration:010d}.weakclip"


def _tag(key: str) -> str:
    if key.startswith("loss"):
        return f"loss/{key}"
    if key == "lr":
        return "lr/lr"
    if key in ("images_per_s", "step_s", "data_wait_s", "crf_wait_s", "crf_wait_share"):
        return f"speed/{key}"
    return f"other/{key}"


def event_file(history: Sequence[Mapping[str, Any]]) -> bytes | None:
    """The bytes of one event file holding every finite number of every row at its
    `iteration`; None when the extra is not installed or no row has an iteration."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    rows = [row for row in history if isinstance(row.get("iteration"), int)]
    if not rows:
        return None
    with tempfile.TemporaryDirectory(prefix="weakclip-tb-") as tmp:
        writer = SummaryWriter(log_dir=tmp)
        for row in rows:
            for key, value in sorted(row.items()):
                if key != "iteration" and isinstance(value, int | float) and math.isfinite(value):
                    writer.add_scalar(_tag(key), float(value), row["iteration"])
        writer.close()
        (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        with open(path, "rb") as f:
            return f.read()


def write_segment(
    directory: Location, history: Sequence[Mapping[str, Any]], *, after: int, last: int
) -> bool:
    """Writes the segment of the rows with `after < iteration <= last` (named by `last`);
    False when there is none to write (no such row, or no extra)."""
    data = event_file(
        [
            r
            for r in history
            if isinstance(r.get("iteration"), int) and after < r["iteration"] <= last
        ]
    )
    if data is None:
        return False
    write_bytes_atomic(directory, segment_name(last), data)
    return True


def segments(directory: Location) -> dict[str, int]:
    """{file name: size in bytes} of the segments in `directory` (none when it is absent)."""
    fs = directory.fs
    fs.invalidate_cache(directory.path)  # another process (rank 0) writes them
    if not fs.exists(directory.path):
        return {}
    listed = retry_io(lambda: fs.ls(directory.path, detail=True), what=f"list {directory.uri}")
    found = {}
    for info in listed:
        name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "file" and _SEGMENT.fullmatch(name):
            found[name] = int(info["size"])
    return dict(sorted(found.items()))


def prune_segments(directory: Location, *, after: int) -> list[str]:
    """Deletes the segments whose last iteration is past `after` (written by an attempt that
    did not reach its next checkpoint); returns their names."""
    stale = [name for name in segments(directory) if int(_SEGMENT.fullmatch(name)[1]) > after]
    for name in stale:
        path = directory.join(name)
        retry_io(lambda path=path: directory.fs.rm(path), what=f"delete {directory.uri}/{name}")
    return stale
