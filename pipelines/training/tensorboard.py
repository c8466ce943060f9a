"""TensorBoard event files of a training stage's metrics history, when the optional
`tensorboard` extra is installed (`pip install -e '.[tensorboard]'`); nothing otherwise.

The file is written when the stage commits, from the whole history (a resumed run's included),
to `<stage output>/tensorboard/` on any store (local or S3): `tensorboard --logdir <run>`
then shows every logged scalar under `loss/`, `lr/`, `speed/` and `other/` (docs/CONTRACTS.md).
"""

from __future__ import annotations

import glob
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

TENSORBOARD_DIR = "tensorboard"


def _tag(key: str) -> str:
    if key.startswith("loss"):
        return f"loss/{key}"
    if key == "lr":
        return "lr/lr"
    if key in ("images_per_s", "step_s", "data_wait_s", "crf_wait_s", "crf_wait_share"):
        return f"speed/{key}"
    return f"other/{key}"


def event_file(history: Sequence[Mapping[str, Any]]) -> tuple[str, bytes] | None:
    """(file name, bytes) of one event file holding every finite number of every row at its
    `iteration`; None when the extra is not installed or the history is empty."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    if not history:
        return None
    with tempfile.TemporaryDirectory(prefix="weakclip-tb-") as tmp:
        writer = SummaryWriter(log_dir=tmp)
        for row in history:
            step = row.get("iteration")
            if not isinstance(step, int):
                continue
            for key, value in sorted(row.items()):
                if key != "iteration" and isinstance(value, int | float) and math.isfinite(value):
                    writer.add_scalar(_tag(key), float(value), step)
        writer.close()
        (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        with open(path, "rb") as f:
            return os.path.basename(path), f.read()
