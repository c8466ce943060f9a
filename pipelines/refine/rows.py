"""One refine row: an ingest row's image and CAM → its CRF seed, CAM argmax and ground truth.

Pure: bytes and numbers in, bytes and arrays out (unit-tested without Ray). Writes the refine
columns (`REFINE_SCHEMA`), the seed as a VOC-palette PNG.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipelines.io import schema
from pipelines.io.codecs import (
    decode_cam_column,
    decode_label_map,
    decode_rgb,
    encode_label_png,
    row_size,
)
from pipelines.io.rows import RowRejected, check_image_id
from pipelines.seeds import SeedConfig, cam_argmax, refine_seed

REFINE_SCHEMA = schema.arrow_schema(schema.REFINE_COLUMNS)


@dataclass(frozen=True)
class RefinedRow:
    """A refined row: its refine-shard columns and what evaluation needs."""

    columns: dict[str, Any]  # the REFINE_COLUMNS of the output row
    seed: np.ndarray  # H x W uint8 seed labels, 255 = ignore
    argmax: np.ndarray  # H x W uint8 CAM argmax (the unrefined baseline)
    gt: np.ndarray | None  # H x W uint8 ground truth, 255 = ignore
    crf_seconds: float  # wall time inside `refine_seed`


def refine_row(row: Mapping[str, Any], *, config: SeedConfig, num_classes: int) -> RefinedRow:
    """Seed labels (`columns["seed"]`, a VOC-palette PNG) and CAM argmax (background at
    `config.bg_threshold`) of one row of ingest columns, in a space of `num_classes` classes.

    Raises:
        RowRejected: undecodable image, CAM or GT, mismatched shapes, bad class ids.
    """
    image_id = row.get(schema.IMAGE_ID)
    if not isinstance(image_id, str) or not image_id:
        raise RowRejected("missing image id")
    check_image_id(image_id)  # later stages name files after it
    height, width = row_size(row)
    labels = list(row.get(schema.LABELS) or [])
    if any(not isinstance(c, int) or not 1 <= c < num_classes for c in labels):
        raise RowRejected(f"label class ids {labels} outside [1, {num_classes})")
    if not isinstance(row.get(schema.IMAGE), bytes):
        raise RowRejected("missing image bytes")
    if not isinstance(row.get(schema.CAM), bytes):
        raise RowRejected("missing CAM bytes")
    cam_classes = [int(c) for c in row.get(schema.CAM_CLASSES) or []]
    try:
        cams = decode_cam_column(row[schema.CAM], len(cam_classes), height, width)
    except ValueError as exc:
        raise RowRejected(f"undecodable CAM: {exc}") from None
    image = decode_rgb(row[schema.IMAGE], height=height, width=width)
    gt = row.get(schema.GT)
    if gt is not None:
        gt = decode_label_map(gt, "ground truth", (height, width), num_classes=num_classes)
    seed_config = replace(config, num_classes=num_classes)
    try:
        argmax = cam_argmax(cams, cam_classes, bg_threshold=config.bg_threshold)
        start = time.perf_counter()
        seed = refine_seed(image, cams, cam_classes, config=seed_config)
        crf_seconds = time.perf_counter() - start
    except ValueError as exc:
        raise RowRejected(f"cannot refine: {exc}") from None
    columns = {
        schema.IMAGE_ID: image_id,
        schema.IMAGE: row[schema.IMAGE],
        schema.HEIGHT: height,
        schema.WIDTH: width,
        schema.LABELS: labels,
        schema.SEED: encode_label_png(seed),
        schema.GT: row.get(schema.GT),
        schema.SPLIT: row.get(schema.SPLIT),
    }
    return RefinedRow(columns, seed, argmax, gt, crf_seconds)
