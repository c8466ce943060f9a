"""The images a run report shows, chosen while scoring: the worst and the best by per-image mIoU
and a deterministic random sample, each list bounded (`RANKED_IMAGES`), whatever the number of
images (docs/CONTRACTS.md, evaluate).

An entry is `[miou, image_id, split, gt_path, row_group, row, pred_path, pred_row_group]`: where
the image's ground-truth row and its prediction lie (a mask file: row group -1; else the row
group holding its `seed`), so that a report reads only those. Per-image mIoU is the mean IoU
over the classes in that image's ground truth or prediction (`score_from_confusion`).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Mapping, Sequence
from typing import Any

RANKED_IMAGES = 8  # entries per list


def sample_key(image_id: str) -> str:
    """The sample keeps the ids with the smallest SHA-256 (the same on any machine, in any
    order of scoring): a uniform random sample of fixed size."""
    return hashlib.sha256(str(image_id).encode()).hexdigest()


LISTS = ("worst", "best", "sample")


def _sample_order(entry: Sequence[Any]) -> str:
    return sample_key(entry[1])


def _score_order(entry: Sequence[Any]) -> tuple[float, str]:
    return entry[0], sample_key(entry[1])  # ties broken the same on any machine


class RankedImages:
    """Bounded worst / best / sample lists, mergeable across tasks (`add_record`)."""

    def __init__(self, count: int = RANKED_IMAGES) -> None:
        self.count = count
        self.lists: dict[str, list[list[Any]]] = {name: [] for name in LISTS}

    def add(self, entry: Sequence[Any]) -> None:
        """One scored image (an entry as above); a NaN mIoU (no
        class in GT nor prediction) counts for the sample only."""
        for name in LISTS:
            self._push(name, list(entry))

    def add_record(self, record: Mapping[str, Sequence[Sequence[Any]]]) -> None:
        """Merges another `record()` (of other images)."""
        for name in LISTS:
            for e in record.get(name, ()):
                self._push(name, [math.nan if e[0] is None else float(e[0]), *e[1:]])

    def _push(self, name: str, entry: list[Any]) -> None:
        entries = [*self.lists[name], entry]
        if name == "sample":
            self.lists[name] = heapq.nsmallest(self.count, entries, key=_sample_order)
        elif not math.isnan(entry[0]):
            pick = heapq.nsmallest if name == "worst" else heapq.nlargest
            self.lists[name] = pick(self.count, entries, key=_score_order)

    def record(self) -> dict[str, list[list[Any]]]:
        """JSON-ready lists (a NaN mIoU as None)."""
        return {
            name: [[None if math.isnan(e[0]) else e[0], *e[1:]] for e in entries]
            for name, entries in self.lists.items()
        }

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """The lists as the evaluate metrics' `images_ranked` (docs/CONTRACTS.md)."""
        return {
            name: [
                {
                    "image_id": image_id,
                    "split": split,
                    "miou": None if math.isnan(miou) else miou,
                    "gt": {"path": path, "row_group": group, "row": row},
                    "prediction": {"path": pred_path, "row_group": pred_group},
                }
                for miou, image_id, split, path, group, row, pred_path, pred_group in entries
            ]
            for name, entries in self.lists.items()
        }
