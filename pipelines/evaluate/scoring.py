"""Scoring for the evaluate stage (docs/METHOD.md): class spaces, one unit's task
(`score_unit`), the sum of its records (`RecordSum`) and the driver's `EvaluationResult`."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.evaluate.ranking import RankedImages
from pipelines.io import schema
from pipelines.io.class_spaces import (
    COCO_UNUSED_IDS,
    ClassSpace,
    coco81_to_coco91,
    coco91_to_coco81,
)
from pipelines.io.codecs import decode_label_map
from pipelines.io.manifest import Manifest
from pipelines.io.parquet import read_row_group
from pipelines.io.rows import RowRejected
from pipelines.io.storage import Location, read_many, retry_io
from pipelines.metrics import NO_SPLIT, confusion_matrix, finite, score_from_confusion
from pipelines.units import reason_kind

PRED_STAGES = ("refine", "pseudo_masks")
GT_STAGES = ("ingest", "refine")
DEFINITION = (
    "IoU_c = TP / (TP + FP + FN) over pixels whose ground truth is not 255; mIoU = nan-mean of "
    "IoU over the averaged classes (a class absent from both GT and prediction has no IoU)"
)
_CONVERSIONS = {("coco91", "coco81"), ("coco81", "coco91")}
_TABLE_COUNTS = "scored prediction_without_gt gt_null gt_without_prediction quarantined".split()


def manifest_space(manifest: Manifest) -> ClassSpace | None:
    """The class space a manifest names, or None when its `class_names` is empty.

    Raises:
        ValueError: the names are not a usable space (no background first, duplicates, ...).
    """
    if not manifest.class_names:
        return None
    try:
        return ClassSpace(manifest.class_space, tuple(manifest.class_names))
    except ValueError as e:
        raise ValueError(f"{manifest.location.uri}: unusable class names: {e}") from None


def label_conversion(source: ClassSpace | None, target: ClassSpace, what: str) -> str | None:
    """How label maps of `source` become ids of `target`: None (same space) or `"a->b"`.

    Raises:
        ValueError: different spaces without an explicit mapping (only coco91 <-> coco81).
    """
    if source is None or source.class_names == target.class_names:
        return None
    if (source.name, target.name) in _CONVERSIONS:
        return f"{source.name}->{target.name}"
    raise ValueError(
        f"{what} is in class space {source.name} ({source.num_classes} classes), which has no "
        f"mapping to {target.name} ({target.num_classes} classes); only coco91 <-> coco81 "
        "converts"
    )


def convert_labels(labels: np.ndarray, conversion: str | None, *, strict: bool) -> np.ndarray:
    """Label map in the target space. Not `strict` (predictions): ids with no counterpart
    become 255 and count as misses. `strict` (ground truth): they raise ValueError."""
    if conversion is None:
        return labels
    if conversion == "coco91->coco81":
        if not strict:
            labels = np.where((labels > 90) | np.isin(labels, COCO_UNUSED_IDS), 255, labels)
        return coco91_to_coco81(labels)
    if conversion == "coco81->coco91":
        if not strict:
            labels = np.where(labels > 80, 255, labels)
        return coco81_to_coco91(labels)
    raise ValueError(f"unknown label conversion {conversion!r}")


def select_classes(space: ClassSpace, items: Sequence[str] | None) -> tuple[int, ...]:
    """Class ids mIoU averages over: every class (None), or the given names / ids.

    Raises:
        ValueError: an item names no class of the space (field `average_over`).
    """
    if items is None:
        return tuple(range(space.num_classes))
    ids: set[int] = set()
    for item in items:
        text = item.strip()
        if text.isdigit() and int(text) < space.num_classes:
            class_id = int(text)
        elif text in space.class_names:
            class_id = space.class_names.index(text)
        else:
            raise ValueError(
                f"average_over: {text[:64]!r} is neither a class name nor an id of "
                f"{space.name} (0..{space.num_classes - 1})"
            )
        ids.add(class_id)
    return tuple(sorted(ids))


def miou_over(iou: Sequence[float], ids: Sequence[int]) -> float | None:
    """Nan-mean of `iou` over `ids`; None when none of them has an IoU."""
    values = np.asarray([iou[i] for i in ids], dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else None


def score_pair(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int,
    *,
    pred_conversion: str | None = None,
    gt_conversion: str | None = None,
) -> np.ndarray:
    """K x (K + 1) confusion matrix of one prediction against its ground truth.

    Raises:
        RowRejected: shapes differ, or GT ids outside the class space (after conversion).
    """
    if pred.shape != gt.shape:
        raise RowRejected(
            f"size mismatch: prediction is {pred.shape[0]}x{pred.shape[1]}, "
            f"ground truth {gt.shape[0]}x{gt.shape[1]}"
        )
    try:
        gt = convert_labels(gt, gt_conversion, strict=True)
        pred = convert_labels(pred, pred_conversion, strict=False)
        return confusion_matrix(pred, gt, num_classes)
    except ValueError as e:
        raise RowRejected(f"bad ground truth: {e}") from None


def _read_predictions(pred_loc: Location, wanted: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """image id -> label PNG bytes, or a reason string where it could not be read."""
    found: dict[str, Any] = {}
    groups: dict[tuple[str, int], set[str]] = defaultdict(set)
    masks: dict[str, str] = {}
    for _, image_id, path, row_group in wanted:
        if row_group < 0:
            masks[path] = image_id
        else:
            groups[(path, row_group)].add(image_id)
    for (path, row_group), ids in groups.items():
        try:  # a storage error is retried, then fails the unit (never a quarantined row)
            table = retry_io(
                lambda path=path, row_group=row_group: read_row_group(
                    pred_loc, path, row_group, [schema.IMAGE_ID, schema.SEED]
                ),
                what=f"read {path}",
            )
            cols = table.to_pydict()
        except (FileNotFoundError, ValueError) as e:  # listed but gone, or not Parquet: data
            for image_id in ids:
                found[image_id] = f"unreadable prediction shard {path}: {type(e).__name__}"
            continue
        for image_id, seed in zip(cols[schema.IMAGE_ID], cols[schema.SEED], strict=True):
            if image_id in ids and image_id not in found:
                found[image_id] = seed
    for rel, blob in read_many(pred_loc, list(masks)).items():  # storage errors raise
        found[masks[rel]] = blob if isinstance(blob, bytes) else "mask file missing"
    return found


def score_unit(
    unit: Mapping[str, Any],
    *,
    gt_loc: Location,
    pred_loc: Location,
    num_classes: int,
    pred_conversion: str | None = None,
    gt_conversion: str | None = None,
) -> dict[str, Any]:
    """Scores the predictions of one ground-truth row group (one Ray task).

    Args:
        unit: from `pipelines.evaluate.plan.plan_units`.

    Returns:
        `scored`, `gt_null`, `gt_without_prediction` ({split: n}), `confusion` ({split:
        {"images", "matrix": K x (K + 1) as a flat list}}), `quarantine` ([[id, source, reason]]),
        `ranked` (`pipelines.evaluate.ranking.RankedImages.record`).
    """
    rel, row_group = unit["gt_path"], unit["gt_row_group"]
    source = f"{rel}#rg{row_group}"
    columns = [schema.IMAGE_ID, schema.GT, schema.HEIGHT, schema.WIDTH, schema.SPLIT]
    cols = read_row_group(gt_loc, rel, row_group, columns).to_pydict()
    predictions = {int(p[0]): p for p in unit["predictions"]}
    pred_data = _read_predictions(pred_loc, unit["predictions"])
    skip = set(unit["skip"])
    total = RecordSum(num_classes)
    splits = cols.get(schema.SPLIT) or [None] * len(cols[schema.IMAGE_ID])
    for position, image_id in enumerate(cols[schema.IMAGE_ID]):
        if position in skip:
            continue
        gt_bytes = cols[schema.GT][position]
        split = splits[position] or NO_SPLIT
        planned = predictions.get(position)
        if planned is None:
            if gt_bytes is not None:
                total.gt_without_prediction[split] += 1
            continue
        if planned[1] != image_id:  # the shard changed under its manifest
            moved = [str(planned[1]), source, "ground truth row moved since planning"]
            total.quarantine.append(moved)
            continue
        if gt_bytes is None:
            total.gt_null += 1
            continue
        try:
            expected = None
            if schema.HEIGHT in cols and schema.WIDTH in cols:
                expected = (int(cols[schema.HEIGHT][position]), int(cols[schema.WIDTH][position]))
            gt = decode_label_map(gt_bytes, "ground truth", expected)
            data = pred_data.get(image_id)
            if isinstance(data, str):
                raise RowRejected(data)
            pred = decode_label_map(data, "prediction", gt.shape)
            matrix = score_pair(
                pred, gt, num_classes, pred_conversion=pred_conversion, gt_conversion=gt_conversion
            )
        except RowRejected as e:
            total.quarantine.append([image_id, source, e.reason])
            continue
        except (TypeError, ValueError) as e:  # e.g. a null height in the GT row
            total.quarantine.append([image_id, source, f"bad ground truth row: {e}"])
            continue
        total.add_matrix(split, matrix)
        total.scored += 1
        miou = score_from_confusion(matrix).miou
        where = [rel, row_group, position, planned[2], planned[3]]
        total.ranked.add([miou, str(image_id), split, *where])
    return total.record()


class RecordSum:
    """Sums `score_unit` records (in a unit, in a task, then on the driver)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.scored = 0
        self.gt_null = 0
        self.gt_without_prediction: Counter[str] = Counter()
        self.images: Counter[str] = Counter()
        self.matrices: dict[str, np.ndarray] = {}
        self.quarantine: list[list[str]] = []
        self.ranked = RankedImages()

    def add(self, record: Mapping[str, Any]) -> None:
        k = self.num_classes
        self.scored += record["scored"]
        self.gt_null += record["gt_null"]
        self.gt_without_prediction.update(record["gt_without_prediction"])
        self.quarantine.extend(record["quarantine"])
        self.ranked.add_record(record.get("ranked", {}))
        for split, entry in record["confusion"].items():
            matrix = np.asarray(entry["matrix"], dtype=np.int64).reshape(k, k + 1)
            self.add_matrix(split, matrix, entry["images"])

    def add_matrix(self, split: str, matrix: np.ndarray, images: int = 1) -> None:
        """The K x (K + 1) confusion of `images` scored images of `split`."""
        self.matrices[split] = self.matrices.get(split, 0) + matrix
        self.images[split] += images

    def record(self) -> dict[str, Any]:
        """The sum, in `score_unit`'s record format."""
        return {
            "scored": self.scored,
            "gt_null": self.gt_null,
            "gt_without_prediction": dict(self.gt_without_prediction),
            "confusion": {
                split: {"images": self.images[split], "matrix": matrix.ravel().tolist()}
                for split, matrix in self.matrices.items()
            },
            "quarantine": self.quarantine,
            "ranked": self.ranked.record(),
        }


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """The summed records of one evaluation (`total`) and what the driver adds to them."""

    prediction: Mapping[str, str]  # {"uri", "stage"} of the prediction output
    ground_truth: Mapping[str, str]  # the same of the ground-truth output
    space: ClassSpace
    average_over: tuple[int, ...]  # class ids the headline mIoU averages over
    total: RecordSum
    counts: Mapping[str, int]
    quarantine: tuple[tuple[str, str, str], ...] = ()  # (image id, source, reason)
    conversions: Mapping[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def confusion(self) -> np.ndarray:
        """K x (K + 1) over every scored image, all splits."""
        k = self.space.num_classes
        return sum(self.total.matrices.values(), np.zeros((k, k + 1), np.int64))

    @property
    def per_class_iou(self) -> tuple[float, ...]:
        """IoU per class id (nan where a class is absent from both GT and prediction)."""
        return score_from_confusion(self.confusion).per_class_iou

    @property
    def miou(self) -> float | None:
        """Nan-mean IoU over `average_over`; None when nothing was scored."""
        return miou_over(self.per_class_iou, self.average_over)

    def metrics(self) -> dict[str, Any]:
        """JSON-ready metrics (fractions in [0, 1], null for undefined IoU)."""
        iou, names, total = self.per_class_iou, self.space.class_names, self.total
        averaged = self.average_over
        by_split = {k: score_from_confusion(m).per_class_iou for k, m in total.matrices.items()}
        reasons = Counter(reason_kind(reason) for _, _, reason in self.quarantine)
        return {
            "miou": self.miou,
            "per_class_iou": dict(zip(names, map(finite, iou), strict=True)),
            "class_space": self.space.name,
            "num_classes": len(names),
            "averaged_over": [names[i] for i in averaged],
            "classes_with_iou": sum(1 for i in averaged if not math.isnan(iou[i])),
            "miou_all_classes": miou_over(iou, range(len(iou))),
            "definition": DEFINITION,
            "images": sum(total.images.values()),
            "num_pixels": int(self.confusion.sum()),
            "by_split": {
                split: {"images": total.images[split], "miou": miou_over(split_iou, averaged)}
                for split, split_iou in sorted(by_split.items())
            },
            "counts": dict(self.counts),
            "gt_without_prediction_by_split": dict(sorted(total.gt_without_prediction.items())),
            "quarantine_reasons": dict(reasons.most_common()),
            "conversions": dict(self.conversions),
            "prediction": dict(self.prediction),
            "ground_truth": dict(self.ground_truth),
            "images_ranked": self.total.ranked.metrics(),
        }

    def confusion_file(self) -> dict[str, Any]:
        """`confusion.json`: the K x (K + 1) counts over every scored image (rows: ground truth,
        columns: prediction, the last one pixels predicted as ignore) and the class names."""
        return {
            "class_names": list(self.space.class_names),
            "matrix": self.confusion.tolist(),
        }


def _printable(text: str, limit: int = 40) -> str:
    """Untrusted names on a terminal: control characters replaced, length capped."""
    clean = "".join(c if c.isprintable() else "?" for c in str(text))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def format_table(metrics: Mapping[str, Any]) -> str:
    """The per-class IoU table (percent) and mIoU of `EvaluationResult.metrics()` output."""

    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{100 * value:6.2f}"

    counts = metrics.get("counts", {})
    averaged = set(metrics.get("averaged_over", []))
    per_class = metrics.get("per_class_iou", {})
    lines = [
        f"prediction:   {_printable(metrics['prediction']['uri'], 200)} "
        f"({metrics['prediction']['stage']})",
        f"ground truth: {_printable(metrics['ground_truth']['uri'], 200)} "
        f"({metrics['ground_truth']['stage']})",
        "images:       "
        + ", ".join(
            f"{key.replace('_', ' ')} {counts[key]}" for key in _TABLE_COUNTS if key in counts
        ),
    ]
    reasons = metrics.get("quarantine_reasons") or {}
    if reasons:
        shown = ", ".join(f"{_printable(k)}: {v}" for k, v in list(reasons.items())[:5])
        lines.append(f"quarantined:  {shown}")
    width = max([len("class")] + [len(_printable(n)) for n in per_class])
    lines.append(f"{'class':<{width}}  IoU %")
    for name, value in per_class.items():
        mark = "" if name in averaged else "  (not averaged)"
        lines.append(f"{_printable(name):<{width}}  {pct(value)}{mark}")
    lines.append(
        f"{'mIoU':<{width}}  {pct(metrics.get('miou'))}  (class space "
        f"{metrics.get('class_space')}, nan-mean over {metrics.get('classes_with_iou')} of "
        f"{len(averaged)} averaged classes with an IoU)"
    )
    for split, entry in (metrics.get("by_split") or {}).items():
        lines.append(
            f"  split {_printable(split)}: mIoU {pct(entry['miou'])} ({entry['images']} images)"
        )
    return "\n".join(lines)
