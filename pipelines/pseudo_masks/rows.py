"""Per-row work of the pseudo-mask stage that needs no model: validation and CRF post-processing.

The Ray Data batch wrappers `read_unit` (first stage) and `postprocess_rows` (last stage) frame
the model stage (`infer.MaskPredictor`). Rows travel as columns `meta` (JSON: id, unit, size,
labels, split, the reason when rejected, confusion counts, timings), `image`, `gt` (PNG, b""
when none) and, after the model, `probs` (float16 C x H x W of the classes
`meta["prob_classes"]`); a rejected row keeps flowing with its reason. Confusion counts are
sparse (`pipelines.metrics.to_sparse`): a few (index, count) pairs replace a K x (K + 1) matrix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.io import parquet, schema
from pipelines.io.codecs import (
    MAX_PIXELS,
    decode_cam_column,
    decode_label_map,
    decode_rgb,
    encode_label_png,
    row_size,
)
from pipelines.io.rows import RowRejected, check_image_id
from pipelines.io.storage import Location, write_bytes_atomic
from pipelines.metrics import sparse_confusion
from pipelines.seeds import cam_argmax, crf_kwargs
from weakclip.config import CRFConfig

MASK_DIR = "masks"
META, IMAGE, GT, PROBS = "meta", "image", "gt", "probs"  # columns between the stages


@dataclass(frozen=True)
class RowSpec:
    """What the first stage needs to know about the input (picklable, sent to tasks)."""

    num_classes: int  # K, size of the class space
    input_stage: str  # "ingest" (baseline: CAM argmax) or "refine" (baseline: seeds)
    splits: tuple[str, ...] | None  # None = every row; rows without a split always count
    cam_bg_threshold: float = 0.43  # background plane of the CAM-argmax baseline
    max_pixels: int = MAX_PIXELS  # images above this are rejected before decoding

    @property
    def baseline(self) -> str:
        return "cam_argmax" if self.input_stage == "ingest" else "seeds"


@dataclass(frozen=True)
class PseudoUnit:
    """One input row group, the stage's unit of work and of resumption."""

    name: str  # `pipelines.units.unit_name`: names the unit's index shard and record
    path: str  # input shard, relative to the input directory
    row_group: int
    rows: int  # rows in the row group
    selected: int  # rows in the chosen splits (what the unit emits)
    duplicates: dict[str, str]  # row index (as a string) → reason: an earlier row has its id


def in_splits(split: Any, splits: tuple[str, ...] | None) -> bool:
    """Whether a row with `split` is processed: always without a split or a split filter."""
    return splits is None or split is None or split in splits


def mask_rel(image_id: str) -> str:
    """Relative path of an image's pseudo mask (the id must have passed `check_image_id`)."""
    return f"{MASK_DIR}/{image_id}.png"


def row_cam_argmax(row: Mapping[str, Any], bg_threshold: float) -> np.ndarray:
    """H x W CAM argmax of an ingest row (ValueError: CAM bytes not of the row's shape)."""
    classes = [int(c) for c in row[schema.CAM_CLASSES] or []]
    planes = decode_cam_column(row[schema.CAM], len(classes), row[schema.HEIGHT], row[schema.WIDTH])
    return cam_argmax(planes, classes, bg_threshold=bg_threshold)


def check_labels(raw: Any, num_classes: int) -> list[int]:
    """Sorted unique foreground class ids of a row, each in [1, K) (else RowRejected)."""
    if raw is None:
        raw = []
    if not isinstance(raw, list | tuple) or not all(
        isinstance(c, int | np.integer) and not isinstance(c, bool) for c in raw
    ):
        raise RowRejected("labels must be a list of class ids")
    labels = sorted({int(c) for c in raw})
    bad = [c for c in labels if not 1 <= c < num_classes]
    if bad:
        raise RowRejected(f"labels hold class ids {bad[:5]} outside [1, {num_classes})")
    return labels


def prepare_row(row: Mapping[str, Any], spec: RowSpec) -> tuple[dict[str, Any], bytes, bytes]:
    """Validates one input row (ingest or refine columns) and scores its baseline against the
    ground truth: (meta, image bytes, GT bytes or b""), meta with `image_id`, `height`,
    `width`, `labels`, `split`, `has_gt` and, with GT, `baseline` (sparse confusion counts).

    Raises:
        RowRejected: an unsafe id, bad size, labels or bytes (the reason says which).
    """
    image_id = check_image_id(row.get(schema.IMAGE_ID))  # type: ignore[arg-type]
    height, width = row_size(row, spec.max_pixels)
    labels = check_labels(row.get(schema.LABELS), spec.num_classes)
    image_bytes = row.get(schema.IMAGE)
    if not isinstance(image_bytes, bytes) or not image_bytes:
        raise RowRejected("missing image bytes")
    decode_rgb(image_bytes, height=height, width=width)  # proves the bytes decode at that size
    gt_bytes = row.get(schema.GT)
    meta: dict[str, Any] = {
        "image_id": image_id,
        "height": height,
        "width": width,
        "labels": labels,
        "split": row.get(schema.SPLIT),
        "has_gt": isinstance(gt_bytes, bytes) and bool(gt_bytes),
    }
    shape, num_classes = (height, width), spec.num_classes
    gt = None
    if meta["has_gt"]:
        gt = decode_label_map(gt_bytes, "ground truth", shape, num_classes=num_classes)
    if spec.input_stage == "refine":
        baseline = decode_label_map(row.get(schema.SEED), "seed", shape)
    else:
        classes = [int(c) for c in row.get(schema.CAM_CLASSES) or []]
        if any(not 1 <= c < spec.num_classes for c in classes) or not isinstance(
            row.get(schema.CAM), bytes
        ):
            raise RowRejected("missing CAM or CAM classes outside the class space")
        try:
            baseline = row_cam_argmax(row, spec.cam_bg_threshold)
        except ValueError as exc:
            raise RowRejected(f"undecodable CAM: {exc}") from None
    if gt is not None:
        meta["baseline"] = sparse_confusion(baseline, gt, spec.num_classes)
    return meta, image_bytes, gt_bytes if meta["has_gt"] else b""  # type: ignore[return-value]


def read_columns(stage: str) -> tuple[str, ...]:
    """The columns the first stage reads of an ingest or refine input."""
    extra = (schema.SEED,) if stage == "refine" else (schema.CAM, schema.CAM_CLASSES)
    base = (schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.LABELS)
    return (*base, schema.GT, schema.SPLIT, *extra)


def read_unit(
    batch: dict[str, np.ndarray], *, input_loc: Location, spec: RowSpec
) -> dict[str, np.ndarray]:
    """Ray Data wrapper: column `unit` (JSON `PseudoUnit`) in; one row per selected input row
    out (`meta`, `image`, `gt`), rejected rows included with `meta["reason"]`."""
    metas: list[str] = []
    images: list[bytes] = []
    gts: list[bytes] = []
    columns = read_columns(spec.input_stage)  # those the unit's shard has are read
    for unit_json in batch["unit"]:
        unit = PseudoUnit(**json.loads(unit_json))
        table = parquet.read_row_group(input_loc, unit.path, unit.row_group, columns)
        for index, row in enumerate(table.to_pylist()):
            if not in_splits(row.get(schema.SPLIT), spec.splits):
                continue
            base = {"unit": unit.name, "row": index, "split": row.get(schema.SPLIT)}
            image_bytes = gt_bytes = b""
            try:
                if str(index) in unit.duplicates:
                    raise RowRejected(unit.duplicates[str(index)])
                meta, image_bytes, gt_bytes = prepare_row(row, spec)
                meta = {**base, **meta}
            except RowRejected as exc:
                meta = {**base, "image_id": str(row.get(schema.IMAGE_ID)), "reason": exc.reason}
            metas.append(json.dumps(meta))
            images.append(image_bytes)
            gts.append(gt_bytes)
    return {
        META: np.asarray(metas, dtype=object),
        IMAGE: np.asarray(images, dtype=object),
        GT: np.asarray(gts, dtype=object),
    }


def postprocess(
    image: np.ndarray, probs: np.ndarray, classes: Sequence[int], *, crf: CRFConfig | None
) -> np.ndarray:
    """H x W uint8 pseudo mask (each pixel one of `classes`) of an H x W x 3 uint8 image from
    the C x H x W probabilities of its C ascending `classes`: the post-processing CRF (softmax
    unary), or with `crf` None the argmax."""
    from weakclip.crf import dense_crf

    lookup = np.asarray(classes, dtype=np.uint8)
    if probs.shape[0] == 1:
        return np.full(probs.shape[1:], lookup[0], np.uint8)
    if crf is not None:
        probs = dense_crf(image, np.asarray(probs, dtype=np.float32), **crf_kwargs(crf))
    return lookup[np.asarray(probs).argmax(axis=0)]


def finish_row(
    meta: dict[str, Any],
    image_bytes: bytes,
    gt_bytes: bytes,
    probs_bytes: bytes,
    *,
    output_loc: Location,
    crf: CRFConfig | None,
    num_classes: int,
) -> dict[str, Any]:
    """CRF, mask PNG written to `masks/<id>.png`, and its confusion counts against the GT:
    `meta` plus `mask_bytes`, `crf_s` and (with GT) `pseudo_masks` sparse counts, or plus
    `reason` when the row cannot be finished."""
    started = time.perf_counter()
    height, width = meta["height"], meta["width"]
    classes = [int(c) for c in meta["prob_classes"]]
    try:
        image = decode_rgb(image_bytes, height=height, width=width)
        expected = len(classes) * height * width * 2
        if len(probs_bytes) != expected:
            raise RowRejected(f"probabilities hold {len(probs_bytes)} bytes, expected {expected}")
        probs = np.frombuffer(probs_bytes, np.float16).reshape(len(classes), height, width)
        mask = postprocess(image, probs, classes, crf=crf)
    except (RowRejected, ValueError) as exc:
        reason = exc.reason if isinstance(exc, RowRejected) else f"post-processing failed: {exc}"
        return {**meta, "reason": reason}
    crf_seconds = time.perf_counter() - started
    data = encode_label_png(mask)
    write_bytes_atomic(output_loc, mask_rel(meta["image_id"]), data)
    result = {**meta, "mask_bytes": len(data), "crf_s": crf_seconds}
    if meta.get("has_gt"):
        gt = decode_label_map(gt_bytes, "ground truth")
        result["pseudo_masks"] = sparse_confusion(mask, gt, num_classes)
    return result


def postprocess_rows(batch: dict[str, np.ndarray], **finish: Any) -> dict[str, np.ndarray]:
    """Ray Data wrapper of `finish_row` (`finish`: its keyword arguments): `meta`, `image`,
    `gt`, `probs` in; `meta` out."""
    out = []
    for meta_json, *data in zip(batch[META], batch[IMAGE], batch[GT], batch[PROBS], strict=True):
        meta = json.loads(meta_json)
        if not meta.get("reason"):
            meta = finish_row(meta, *(bytes(d) for d in data), **finish)
        out.append(json.dumps(meta))
    return {META: np.asarray(out, dtype=object)}
