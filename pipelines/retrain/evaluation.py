"""Scoring the retrained network on val ground truth, at the original image size (docs/METHOD.md).

The training workers score the network right after the last step, on their device. The val rows
(`pipelines.retrain.data.plan_rows`) are dealt to the workers by position in sorted id order
(`ids_of_rank`); each reads only the row groups holding its ids, and `score_worker` sums the
confusion matrices over the workers. A val row that cannot be decoded is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.io import schema
from pipelines.io.codecs import decode_image, decode_label_map
from pipelines.io.parquet import read_row_group
from pipelines.io.storage import Location
from pipelines.metrics import ConfusionAccumulator
from pipelines.retrain.model import predict_labels
from pipelines.training.worker import all_reduce_sum

VAL_COLUMNS = [schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.GT]


def ids_of_rank(val_ids: Iterable[str], rank: int, world: int) -> list[str]:
    """The val ids worker `rank` of `world` scores (every id goes to exactly one worker)."""
    return sorted(val_ids)[rank::world]


def read_val_rows(
    source: Location, refs: Mapping[str, tuple[str, int]], ids: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """The source rows of `ids`, reading only the row groups `refs` (id → (shard, group)) names."""
    wanted = set(ids)
    for path, group in sorted({refs[image_id] for image_id in wanted}):
        for row in read_row_group(source, path, group, VAL_COLUMNS).to_pylist():
            if row[schema.IMAGE_ID] in wanted:
                yield row


def score_rows(
    model: nn.Module,
    rows: Iterable[Mapping[str, Any]],
    *,
    scores: ConfusionAccumulator,
    device: torch.device | str = "cpu",
) -> tuple[int, int]:
    """Adds each row's prediction against its GT to `scores`; returns (scored, skipped)."""
    images = skipped = 0
    for row in rows:
        height, width = int(row[schema.HEIGHT]), int(row[schema.WIDTH])
        try:
            rgb = decode_image(row[schema.IMAGE], height, width)
            gt = decode_label_map(row[schema.GT], height, width)
            scores.add(predict_labels(model, rgb, device=device), gt)
        except (OSError, ValueError, TypeError, SyntaxError, EOFError):
            skipped += 1
            continue
        images += 1
    return images, skipped


def score_worker(
    model: nn.Module,
    rows: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    device: torch.device,
    world: int,
) -> dict[str, Any]:
    """This worker's rows scored and summed over the workers (a collective: call on every rank):
    `confusion` (K x (K + 1) nested lists), `images`, `skipped`."""
    scores = ConfusionAccumulator(num_classes)
    was_training = model.training
    model.eval()
    images, skipped = score_rows(model, rows, scores=scores, device=device)
    model.train(was_training)
    totals = torch.from_numpy(np.append(scores.matrix.ravel(), [images, skipped]))
    values = all_reduce_sum(totals, device, world).numpy()
    return {
        "confusion": values[:-2].reshape(scores.matrix.shape).tolist(),
        "images": int(values[-2]),
        "skipped": int(values[-1]),
    }


def score_dict(confusion: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """`miou` (None without scored pixels), `per_class_iou` by class name, `num_pixels`."""
    scores = ConfusionAccumulator(len(class_names))
    scores.merge(np.asarray(confusion, dtype=np.int64))
    values = scores.score().as_dict(class_names)
    if values["num_pixels"] == 0 or np.isnan(values["miou"]):
        values["miou"] = None
    return values
