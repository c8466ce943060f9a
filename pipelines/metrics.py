"""Segmentation quality: confusion matrix over valid ground-truth pixels, per-class IoU, mIoU.

IoU_c = TP / (TP + FP + FN) over pixels whose ground truth is not 255; mIoU is the nan-mean over
classes that occur in the ground truth or the prediction (docs/METHOD.md). Pure numpy.
Completion records carry confusion counts sparse (`to_sparse`, `add_sparse`): a few (index,
count) pairs for a K x (K + 1) matrix, whatever K (91 for COCO).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.io.schema import IGNORE_INDEX


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (gt class, predicted class) pairs over the pixels where gt is valid.

    Args:
        pred: H x W integer class ids; 255 (or any id outside the class space) counts as a
            miss for that pixel's gt class and as nobody's false positive.
        gt: H x W integer class ids, 255 = ignore.
        num_classes: K, the size of the class space (21 VOC, 81 or 91 COCO).

    Returns:
        K x (K + 1) int64 matrix: rows = ground truth, columns = prediction, the last column
        counting valid gt pixels predicted as ignore.

    Raises:
        ValueError: shapes differ, or a valid gt id is outside [0, K).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    gt = gt.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    valid = gt != IGNORE_INDEX
    gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground truth holds class ids outside [0, {num_classes}) besides 255")
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    counts = np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1).astype(np.int64)


def sparse_confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    """`confusion_matrix(pred, gt, K)` in the sparse form of `to_sparse`."""
    return to_sparse(confusion_matrix(pred, gt, num_classes))


def add_sparse(matrix: np.ndarray, sparse: Mapping[str, Sequence[int]]) -> None:
    """Adds sparse counts into a K x (K + 1) matrix in place.

    Raises:
        ValueError: an index outside the matrix (a corrupt record).
    """
    index = np.asarray(sparse["idx"], dtype=np.int64)
    counts = np.asarray(sparse["cnt"], dtype=np.int64)
    if index.shape != counts.shape or (
        index.size and (index.min() < 0 or index.max() >= matrix.size)
    ):
        raise ValueError("sparse confusion counts do not fit the class space")
    np.add.at(matrix.reshape(-1), index, counts)


def to_sparse(matrix: np.ndarray) -> dict[str, list[int]]:
    """The non-zero entries of a matrix as flat indices and counts."""
    flat = matrix.ravel()
    index = np.flatnonzero(flat)
    return {"idx": index.tolist(), "cnt": flat[index].tolist()}


@dataclass(frozen=True)
class SegmentationScore:
    """mIoU and per-class IoU (nan where a class is absent from both gt and prediction)."""

    miou: float
    per_class_iou: tuple[float, ...]
    num_pixels: int

    def as_dict(self, class_names: Sequence[str]) -> dict:
        iou = self.per_class_iou
        if len(class_names) != len(iou):
            raise ValueError(f"{len(class_names)} class names for {len(iou)} classes")
        return {
            "miou": self.miou,
            "per_class_iou": dict(zip(class_names, map(finite, iou), strict=True)),
            "num_pixels": self.num_pixels,
        }


def score_from_confusion(conf: np.ndarray) -> SegmentationScore:
    """Per-class IoU and nan-mean mIoU from a K x (K + 1) `confusion_matrix` (or K x K)."""
    k = conf.shape[0]
    tp = np.diag(conf[:, :k]).astype(np.float64)
    gt_total = conf.sum(axis=1).astype(np.float64)  # TP + FN (ignore predictions included)
    pred_total = conf[:, :k].sum(axis=0).astype(np.float64)  # TP + FP
    union = gt_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    miou = float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")
    return SegmentationScore(miou, tuple(float(v) for v in iou), int(conf.sum()))


class ConfusionAccumulator:
    """Sums confusion matrices over many images (and across workers: add the `.matrix`es)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.matrix += confusion_matrix(pred, gt, self.num_classes)

    def merge(self, other: np.ndarray) -> None:
        if other.shape != self.matrix.shape:
            raise ValueError(
                f"confusion matrix of shape {other.shape}, expected {self.matrix.shape}"
            )
        self.matrix += other

    def score(self) -> SegmentationScore:
        return score_from_confusion(self.matrix)


NO_SPLIT = "(none)"  # metrics key of rows without a split


def finite(value: float) -> float | None:
    """None for NaN (JSON has no NaN: a score nobody could compute)."""
    return None if math.isnan(value) else value


def sum_by_split(
    records: Iterable[Mapping[str, Any]],
    keys: Sequence[str],
    num_classes: int,
    add: Callable[[np.ndarray, Any], None],
) -> dict[str, dict[str, Any]]:
    """The records' per-split confusion (`confusion`: {split: {"images", key: counts}}, for
    the scored predictions `keys`) summed: {split: {"images": n, key: K x (K + 1) matrix}};
    `add` adds one record's counts of a key (dense or sparse) into a matrix in place."""
    shape = (num_classes, num_classes + 1)
    totals: dict[str, dict[str, Any]] = {}
    for record in records:
        for split, conf in record["confusion"].items():
            acc = totals.setdefault(
                split, {"images": 0, **{key: np.zeros(shape, np.int64) for key in keys}}
            )
            acc["images"] += conf["images"]
            for key in keys:
                add(acc[key], conf[key])
    return totals


def summed_metrics(
    records: Iterable[Mapping[str, Any]],
    keys: Sequence[str],
    class_names: Sequence[str],
    add: Callable[[np.ndarray, Any], None],
    *,
    class_space: str,
    ground_truth: str,
    headline: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Manifest metrics of the records' `sum_by_split`; None when no record scored an image.

    Returns:
        `class_space`, `num_classes`, `ground_truth` (which rows were scored), `gt_images`,
        `extra`, one score per key over all splits (`miou` None when undefined), `miou` and
        `per_class_iou` of `headline` (default: the last key), and `by_split` ({split:
        {"images", key: mIoU, "per_class_iou": {key: {class name: IoU}}}}).
    """
    totals = sum_by_split(records, keys, len(class_names), add)
    if not totals:
        return None
    result: dict[str, Any] = {
        "class_space": class_space,
        "num_classes": len(class_names),
        "ground_truth": ground_truth,
        "gt_images": sum(acc["images"] for acc in totals.values()),
        **(extra or {}),
    }
    for key in keys:
        overall = np.sum([acc[key] for acc in totals.values()], axis=0)
        entry = score_from_confusion(overall).as_dict(class_names)
        entry["miou"] = finite(entry["miou"])
        result[key] = entry
    top = result[headline or keys[-1]]
    result |= {"miou": top["miou"], "per_class_iou": top["per_class_iou"]}
    result["by_split"] = {}
    for split, acc in sorted(totals.items()):
        scores = {key: score_from_confusion(acc[key]).as_dict(class_names) for key in keys}
        result["by_split"][split] = {
            "images": acc["images"],
            **{key: finite(score["miou"]) for key, score in scores.items()},
            "per_class_iou": {key: score["per_class_iou"] for key, score in scores.items()},
        }
    return result
