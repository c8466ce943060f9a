"""Validation of one raw input row (image + CAM + image-level label + optional GT) into a shard row.

Pure functions; every check raises `RowRejected` with a one-line reason for the quarantine
table. CAM pickles go through the restricted loader of `pipelines.io.safe_pickle`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.io import schema
from pipelines.io.class_spaces import ClassSpace, labels_from_multihot
from pipelines.io.codecs import MAX_PIXELS, decode_image_header, decode_label_map
from pipelines.io.rows import RowRejected, check_image_id
from pipelines.io.safe_pickle import CamDecodeError, UnsafePickleError, load_npy_pickle

_CAM_RANGE_TOLERANCE = 1e-3  # float16 storage and min-max normalisation round slightly past [0,1]
LAYOUTS = ("mctformer", "clip-es")
SHARD_SCHEMA = schema.arrow_schema(schema.INGEST_COLUMNS)


@dataclass(frozen=True)
class RowLimits:
    """Bounds applied to untrusted input."""

    max_pixels: int = MAX_PIXELS  # images above this are refused before decoding (bombs)
    max_cam_bytes: int = 2_000_000_000  # one CAM file


def labels_to_class_ids(vector: Any, space: ClassSpace) -> list[int]:
    """Validates an image-level multi-hot vector and returns its class ids (ascending)."""
    if vector is None:
        raise RowRejected("no image-level label for this image id")
    arr = np.asarray(vector, dtype=np.float64)
    try:
        ids = labels_from_multihot(arr, space)
    except ValueError as exc:
        raise RowRejected(f"bad label vector: {exc}") from None
    if not np.all((arr == 0) | (arr == 1)):
        raise RowRejected("label vector holds values other than 0 and 1")
    if not ids:
        raise RowRejected("empty label vector (no foreground class)")
    return ids


def index_to_class_id(index: int, vector_length: int, space: ClassSpace) -> int:
    """Class id of a foreground index in the `cls_labels` vector's index space (CAM dict keys)."""
    if not 0 <= index < vector_length:
        raise RowRejected(f"CAM class index {index} outside [0, {vector_length})")
    one_hot = np.zeros(vector_length)
    one_hot[index] = 1
    try:
        (class_id,) = labels_from_multihot(one_hot, space)
    except ValueError as exc:
        raise RowRejected(f"CAM class index {index}: {exc}") from None
    return class_id


def decode_cam(
    data: bytes | None, *, layout: str, space: ClassSpace, vector_length: int, max_bytes: int
) -> tuple[list[int], np.ndarray]:
    """Decodes a CAM file safely into (class ids, C x H x W float32 planes).

    CAM keys are foreground indices in the label vector's index space (`vector_length` wide).
    """
    if data is None:
        raise RowRejected("missing CAM file")
    if len(data) > max_bytes:
        raise RowRejected(f"CAM file too large ({len(data)} bytes > {max_bytes})")
    try:
        obj = load_npy_pickle(data)
    except UnsafePickleError as exc:
        raise RowRejected(f"unsafe pickle in CAM file refused: {exc}") from None
    except CamDecodeError as exc:
        raise RowRejected(f"undecodable CAM file: {exc}") from None
    if layout == "mctformer":
        keys, planes = _mctformer_planes(obj)
    elif layout == "clip-es":
        keys, planes = _clip_es_planes(obj)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    class_ids = [index_to_class_id(key, vector_length, space) for key in keys]
    if len(set(class_ids)) != len(class_ids):
        raise RowRejected("CAM file repeats a class")
    order = np.argsort(class_ids)
    return [class_ids[i] for i in order], planes[order]


def _mctformer_planes(obj: object) -> tuple[list[int], np.ndarray]:
    if not isinstance(obj, Mapping) or not obj:
        raise RowRejected("CAM file is not a non-empty dict {class index: H x W map}")
    keys, planes = [], []
    for key, plane in obj.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise RowRejected(f"CAM dict key {key!r} is not a class index")
        keys.append(int(key))
        planes.append(_as_plane(plane))
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise RowRejected(f"CAM planes differ in shape: {sorted(shapes)}")
    return keys, np.stack(planes)


def _clip_es_planes(obj: object) -> tuple[list[int], np.ndarray]:
    if not isinstance(obj, Mapping) or "keys" not in obj or "attn_highres" not in obj:
        raise RowRejected('CLIP-ES CAM file must be a dict with "keys" and "attn_highres"')
    keys = np.asarray(obj["keys"])
    cams = obj["attn_highres"]
    if not isinstance(cams, np.ndarray) or cams.ndim != 3:
        raise RowRejected("attn_highres must be a K x H x W array")
    if keys.ndim != 1 or keys.dtype.kind not in "iu" or keys.shape[0] != cams.shape[0]:
        raise RowRejected(f"keys {keys.shape} do not match attn_highres {cams.shape}")
    return [int(k) for k in keys], np.stack([_as_plane(p) for p in cams])


def _as_plane(plane: object) -> np.ndarray:
    if not isinstance(plane, np.ndarray) or plane.ndim != 2 or plane.dtype.kind not in "fiu":
        raise RowRejected("a CAM plane is not a 2-d numeric array")
    if plane.size == 0:
        raise RowRejected("a CAM plane is empty")
    plane = plane.astype(np.float32)
    if not np.all(np.isfinite(plane)):
        raise RowRejected("non-finite CAM values (NaN or inf)")
    lo, hi = float(plane.min()), float(plane.max())
    if lo < -_CAM_RANGE_TOLERANCE or hi > 1 + _CAM_RANGE_TOLERANCE:
        raise RowRejected(f"CAM values outside [0, 1] (min {lo:.3g}, max {hi:.3g})")
    return np.clip(plane, 0.0, 1.0)


def build_row(
    *,
    image_id: str,
    image: bytes | None,
    cam: bytes | None,
    label_vector: Sequence[float] | None,
    gt: bytes | None,
    source: str,
    split: str | None,
    layout: str,
    space: ClassSpace,
    limits: RowLimits,
) -> dict[str, Any]:
    """Validates one raw row and returns the ingest shard row (docs/CONTRACTS.md, ingest columns).

    Raises:
        RowRejected: with the reason to quarantine the row.
    """
    check_image_id(image_id)
    labels = labels_to_class_ids(label_vector, space)
    height, width = decode_image_header(image, max_pixels=limits.max_pixels)
    cam_classes, planes = decode_cam(
        cam,
        layout=layout,
        space=space,
        vector_length=len(label_vector),  # type: ignore[arg-type]  # validated above
        max_bytes=limits.max_cam_bytes,
    )
    if planes.shape[1:] != (height, width):
        raise RowRejected(f"CAM shape {planes.shape[1:]} != image shape {(height, width)}")
    names = space.class_names
    if absent := sorted(set(cam_classes) - set(labels)):
        raise RowRejected(f"CAM class not in the image's labels: {[names[c] for c in absent]}")
    if missing := sorted(set(labels) - set(cam_classes)):
        raise RowRejected(f"labelled classes without a CAM plane: {[names[c] for c in missing]}")
    if gt is not None:  # checked, then stored as given
        decode_label_map(gt, "ground truth", (height, width), num_classes=space.num_classes)
    return {
        schema.IMAGE_ID: image_id,
        schema.IMAGE: image,
        schema.HEIGHT: height,
        schema.WIDTH: width,
        schema.LABELS: labels,
        schema.CAM: np.ascontiguousarray(planes.astype(np.float16)).tobytes(),
        schema.CAM_CLASSES: cam_classes,
        schema.GT: gt,
        schema.SOURCE: source,
        schema.SPLIT: split,
    }
