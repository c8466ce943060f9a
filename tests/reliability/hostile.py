"""A deterministic corpus of hostile inputs for every stage (reliability tests, issue 8).

`pipelines.synthetic.dataset.plant_bad_inputs` covers the raw dataset that ingest reads; this module
covers what the later stages read and a few more raw-dataset defects:

- raw dataset (ingest): `plant_more_bad_inputs` adds rows with a zero-sized image, ground
  truth with class ids outside the class space, a CAM key outside the label vector and CAM
  values outside [0, 1]; `malicious_npy` is a `cls_labels.npy` that runs a command if loaded
  with pickle.
- ingest output (refine reads it): `bad_ingest_rows` gives one shard row per defect (class
  ids out of range, zero or negative sizes, images over the pixel limit, CAM bytes of the
  wrong length, undecodable images/GT, unsafe ids...); `corrupt_parquet` turns a valid
  shard into truncated, garbage, wrong-schema or damaged-page variants;
  `list_missing_file` makes a manifest list a file that is not there.
- checkpoints (`model.pt`, `train_state.pt`, CLIP weights): `tests.reliability.hostile_checkpoints`.
- pseudo-mask output (evaluate and retrain read it): `write_pseudo_mask_output` writes a
  committed `pseudo_masks` stage output whose index may point at missing masks, masks with
  class ids out of range, masks of the wrong size, masks that are not PNG, a path leaving
  the directory and a mask the manifest does not list.

Every malicious payload would create `sentinel` (a local file) if it were ever executed; tests
assert that the file never appears. The bytes depend only on the arguments.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.io import schema
from pipelines.io.codecs import encode_label_png
from pipelines.io.manifest import FileEntry, InputRef, StageOutput, write_parquet
from pipelines.io.manifest_format import MANIFEST
from pipelines.io.safe_pickle import load_cls_labels
from pipelines.io.storage import Location, write_bytes_atomic
from pipelines.synthetic.dataset import (
    CAM_DIR,
    CLS_LABELS,
    GT_DIR,
    IMAGE_DIR,
    cam_file_bytes,
    ingest_row,
    multihot,
    pixel_bomb_png,
)
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, Sample, generate_sample

BOMB_SIDE = 16384  # 268M pixels, past every stage's pixel limit; ~35 kB as a 1-bit PNG


class RunsCommand:
    """Pickles as a call of `os.system(command)`: the shape of every pickle exploit."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def touch_command(sentinel: str) -> RunsCommand:
    """An object whose unpickling creates the file `sentinel`."""
    return RunsCommand(f"touch {shlex.quote(str(sentinel))}")


# ---------------------------------------------------------------------------------------------
# Encoded files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (zero allowed) with no usable pixel data."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def raw_label_png(labels: np.ndarray) -> bytes:
    """An L-mode PNG of arbitrary uint8 class ids (no checks: may hold ids out of range)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def garbage(size: int, *, seed: int = 0) -> bytes:
    """`size` pseudo-random bytes."""
    return np.random.default_rng([seed, 8]).integers(0, 256, size, dtype=np.uint8).tobytes()


def malicious_npy(sentinel: str) -> bytes:
    """An `.npy` object file (as `np.save(allow_pickle=True)` writes) that runs a command."""
    buffer = io.BytesIO()
    container = np.empty((), dtype=object)
    container[()] = {"img_0": touch_command(sentinel)}
    np.save(buffer, container, allow_pickle=True)  # the attacker's side
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Raw dataset (ingest input): defects beyond synthetic.dataset.BAD_INPUTS

# kind -> (image id, keyword its quarantine reason contains, case-insensitively)
MORE_BAD_INPUTS: dict[str, tuple[str, str]] = {
    "zero_sized_image": ("bad_zero_sized_image", "image"),
    "gt_class_range": ("bad_gt_class_range", "outside the class space"),
    "cam_index_range": ("bad_cam_index_range", "outside"),
    "cam_value_range": ("bad_cam_value_range", "outside [0, 1]"),
    "gt_size": ("bad_gt_size", "size"),
}


def plant_more_bad_inputs(
    fs: Any,
    root: str,
    *,
    seed: int = 0,
    height: int = 96,
    width: int = 128,
) -> dict[str, str]:
    """Adds one defective row per `MORE_BAD_INPUTS` kind to a `write_dataset` dataset (train).

    The dataset must use the "mctformer" CAM layout.

    Returns:
        {image id: keyword its quarantine reason must contain (case-insensitive)}.
    """
    labels = load_cls_labels(fs.cat_file(posixpath.join(root, CLS_LABELS)))
    split = fs.cat_file(posixpath.join(root, "train.txt")).decode().splitlines()
    num_foreground = SYNTHETIC_CLASSES.num_classes - 1
    expected: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for offset, (kind, (image_id, keyword)) in enumerate(MORE_BAD_INPUTS.items()):
        sample = generate_sample(2 * 10**6 + offset, seed=seed, height=height, width=width)
        expected[image_id] = keyword
        split.append(image_id)
        labels[image_id] = multihot(sample.labels, num_foreground)
        image = jpeg_bytes(sample.image)
        cams = dict(sample.cams)
        gt = encode_label_png(sample.gt)
        if kind == "zero_sized_image":
            files[f"{IMAGE_DIR}/{image_id}.png"] = png_header_only(0, height)
            image = b""
        elif kind == "gt_class_range":
            bad = sample.gt.copy()
            bad[:4, :4] = SYNTHETIC_CLASSES.num_classes + 7
            gt = raw_label_png(bad)
        elif kind == "cam_index_range":
            cams[num_foreground + 3] = cams[min(cams)]
        elif kind == "cam_value_range":
            first = min(cams)
            cams[first] = cams[first] * 5.0
        elif kind == "gt_size":
            gt = raw_label_png(sample.gt[:-4, :-4])
        if image:
            files[f"{IMAGE_DIR}/{image_id}.jpg"] = image
        files[f"{CAM_DIR}/{image_id}.npy"] = cam_file_bytes(cams, "mctformer")
        files[f"{GT_DIR}/{image_id}.png"] = gt
    fs.pipe({posixpath.join(root, rel): data for rel, data in files.items()})
    buffer = io.BytesIO()
    np.save(buffer, labels, allow_pickle=True)  # writing side: these files are ours
    fs.pipe_file(posixpath.join(root, CLS_LABELS), buffer.getvalue())
    fs.pipe_file(posixpath.join(root, "train.txt"), "".join(f"{i}\n" for i in split).encode())
    return expected


# ---------------------------------------------------------------------------------------------
# Ingest output (refine input)


@dataclass(frozen=True)
class BadRow:
    """One hostile ingest-shard row and what refine must say about it."""

    kind: str
    row: dict[str, Any]  # schema.INGEST_COLUMNS
    keyword: str  # the quarantine reason contains this (case-insensitive)


def good_ingest_rows(
    count: int, *, seed: int = 0, height: int = 64, width: int = 80
) -> list[dict[str, Any]]:
    """`count` valid ingest rows of synthetic samples (every fourth in the val split)."""
    return [
        ingest_row(
            generate_sample(i, seed=seed, height=height, width=width),
            split="val" if i % 4 == 3 else "train",
        )
        for i in range(count)
    ]


def bad_ingest_rows(
    *, num_classes: int, seed: int = 0, height: int = 64, width: int = 80
) -> list[BadRow]:
    """One ingest row per defect refine must quarantine; otherwise valid synthetic rows.

    Args:
        num_classes: K of the dataset's class space (class ids >= K are out of range).
        seed, height, width: generation of the rows' valid content.
    """
    rows: list[BadRow] = []

    def base(kind: str) -> tuple[Sample, dict[str, Any]]:
        sample = generate_sample(3 * 10**6 + len(rows), seed=seed, height=height, width=width)
        row = ingest_row(sample, split="train")
        row[schema.IMAGE_ID] = f"bad_{kind}"
        return sample, row

    def add(kind: str, keyword: str, **changes: Any) -> None:
        _, row = base(kind)
        row.update(changes)
        rows.append(BadRow(kind, row, keyword))

    add("label_class_range", "label", **{schema.LABELS: [num_classes + 5]})
    add("negative_label", "label", **{schema.LABELS: [-3]})
    sample, row = base("cam_class_range")
    row[schema.CAM_CLASSES] = [num_classes + 9] + list(row[schema.CAM_CLASSES][1:])
    rows.append(BadRow("cam_class_range", row, "cam_classes"))
    add("cam_class_count", "cam", **{schema.CAM_CLASSES: []})
    add("zero_height", "size", **{schema.HEIGHT: 0, schema.CAM: b""})
    add("zero_width", "size", **{schema.WIDTH: 0, schema.CAM: b""})
    add("negative_size", "size", **{schema.HEIGHT: -height})
    add(
        "pixel_limit",
        "pixel limit",
        **{
            schema.IMAGE: pixel_bomb_png(BOMB_SIDE),
            schema.HEIGHT: BOMB_SIDE,
            schema.WIDTH: BOMB_SIDE,
            schema.CAM: b"",
            schema.GT: None,
        },
    )
    _, row = base("cam_length")
    row[schema.CAM] = row[schema.CAM][:-2]
    rows.append(BadRow("cam_length", row, "cam"))
    add("missing_cam", "cam", **{schema.CAM: None})
    _, row = base("nonfinite_cam")
    planes = np.frombuffer(row[schema.CAM], np.float16).copy()
    planes[:3] = [np.nan, np.inf, -np.inf]
    row[schema.CAM] = planes.tobytes()
    rows.append(BadRow("nonfinite_cam", row, "finite"))
    _, row = base("cam_value_range")
    row[schema.CAM] = (np.frombuffer(row[schema.CAM], np.float16) * 4 + 2).astype(np.float16)
    row[schema.CAM] = row[schema.CAM].tobytes()
    rows.append(BadRow("cam_value_range", row, "[0, 1]"))
    add("undecodable_image", "undecodable image", **{schema.IMAGE: garbage(200, seed=1)})
    add("missing_image", "image", **{schema.IMAGE: None})
    sample, row = base("image_size_mismatch")
    row[schema.IMAGE] = jpeg_bytes(sample.image[:-8])
    rows.append(BadRow("image_size_mismatch", row, "the row says"))
    sample, row = base("gt_class_range")
    bad_gt = sample.gt.copy()
    bad_gt[:2, :2] = num_classes + 20
    row[schema.GT] = raw_label_png(bad_gt)
    rows.append(BadRow("gt_class_range", row, "ground truth"))
    add("gt_undecodable", "ground truth", **{schema.GT: garbage(100, seed=2)})
    add("gt_zero_sized", "ground truth", **{schema.GT: png_header_only(0, 0)})
    add("unsafe_image_id", "image id", **{schema.IMAGE_ID: "../../escape"})
    add("empty_image_id", "image id", **{schema.IMAGE_ID: ""})
    return rows


def corrupt_parquet(good: bytes) -> dict[str, bytes]:
    """Damaged variants of a valid Parquet file's bytes.

    Returns:
        {"empty", "truncated", "garbage", "not_parquet", "bad_footer", "damaged_pages",
        "wrong_schema"}: a zero-byte file; the first half; random bytes; a JPEG; the right
        magic numbers around a garbage footer; the data pages overwritten with 0xFF under
        an intact footer (readable metadata, unreadable rows); a valid file without the
        ingest columns.
    """
    if good[:4] != b"PAR1" or good[-4:] != b"PAR1":
        raise ValueError("not a Parquet file")
    footer_len = int.from_bytes(good[-8:-4], "little")
    data_end = len(good) - 8 - footer_len
    damaged = bytearray(good)
    damaged[4:data_end] = b"\xff" * (data_end - 4)
    bad_footer = bytearray(good)
    bad_footer[data_end : len(good) - 8] = garbage(footer_len, seed=3)
    other = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), other)
    picture = jpeg_bytes(np.zeros((8, 8, 3), np.uint8))
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "garbage": garbage(len(good), seed=4),
        "not_parquet": picture,
        "bad_footer": bytes(bad_footer),
        "damaged_pages": bytes(damaged),
        "wrong_schema": other.getvalue(),
    }


def list_missing_file(loc: Location, rel: str, *, rows: int = 1, size: int = 1000) -> None:
    """Rewrites a committed output's manifest so that it lists `rel`, which does not exist."""
    doc = json.loads(loc.fs.cat_file(loc.join(MANIFEST)))
    doc["files"].append({"path": rel, "rows": rows, "bytes": size})
    write_bytes_atomic(loc, MANIFEST, json.dumps(doc, indent=1).encode())


# ---------------------------------------------------------------------------------------------
# Pseudo-mask output (evaluate and retrain input)

PSEUDO_MASK_DEFECTS = (
    "missing_mask",
    "mask_class_range",
    "mask_size",
    "mask_not_png",
    "mask_escape",
    "mask_unlisted",
)
_MASK_INDEX_SCHEMA = pa.schema(
    [
        (schema.IMAGE_ID, pa.string()),
        (schema.MASK, pa.string()),
        (schema.HEIGHT, pa.int32()),
        (schema.WIDTH, pa.int32()),
        (schema.LABELS, pa.list_(pa.int16())),
        (schema.CHECKPOINT_SHA256, pa.string()),
        (schema.SPLIT, pa.string()),
    ]
)


def write_pseudo_mask_output(
    loc: Location,
    samples: Sequence[Sample],
    *,
    source: InputRef,
    class_names: Sequence[str],
    defects: Mapping[str, str] | None = None,
    splits: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Writes a committed `pseudo_masks` output: masks = the samples' GT, plus defects.

    Args:
        loc: the output directory.
        samples: images whose GT becomes their (perfect) pseudo mask.
        source: `inputs[0]` of the manifest (the ingest/refine output the images came from).
        class_names: the class space (index = class id).
        defects: {image id: one of PSEUDO_MASK_DEFECTS} for images of `samples` whose mask
            is damaged: listed in the index and the manifest but missing on storage, holding
            class ids >= K, of another size than the index says, not a PNG; or whose index
            path leaves the directory (`masks/../../../etc/passwd`) or names a file that
            exists but is not in the manifest.
        splits: {image id: split}; default "train".

    Returns:
        {image id: defect} as given.
    """
    defects = dict(defects or {})
    unknown = sorted(set(defects.values()) - set(PSEUDO_MASK_DEFECTS))
    if unknown:
        raise ValueError(f"defects: unknown {unknown}; expected some of {PSEUDO_MASK_DEFECTS}")
    strays = sorted(set(defects) - {sample.image_id for sample in samples})
    if strays:
        raise ValueError(f"defects: image ids {strays} are not among the samples")
    out = StageOutput.open(
        loc, stage="pseudo_masks", config={"hostile": sorted(defects.items())}, inputs=[source]
    )
    files: list[FileEntry] = []
    index = []
    for sample in samples:
        image_id = sample.image_id
        rel = f"masks/{image_id}.png"
        height, width = sample.gt.shape
        mask = np.where(sample.gt == schema.IGNORE_INDEX, 0, sample.gt).astype(np.uint8)
        data = encode_label_png(mask)
        defect = defects.get(image_id)
        if defect == "mask_class_range":
            mask = mask.copy()
            mask[:3, :3] = len(class_names) + 11
            data = raw_label_png(mask)
        elif defect == "mask_size":
            data = encode_label_png(mask[: height // 2])
        elif defect == "mask_not_png":
            data = garbage(300, seed=5)
        write_bytes_atomic(loc, rel, data)
        if defect == "mask_escape":
            rel = "masks/../../../etc/passwd"
        elif defect != "mask_unlisted":
            files.append(FileEntry(rel, None, len(data)))
        index.append(
            {
                schema.IMAGE_ID: image_id,
                schema.MASK: rel,
                schema.HEIGHT: height,
                schema.WIDTH: width,
                schema.LABELS: list(sample.labels),
                schema.CHECKPOINT_SHA256: "0" * 64,
                schema.SPLIT: (splits or {}).get(image_id, "train"),
            }
        )
    files.append(
        write_parquet(
            loc, "shards/part-00000.parquet", pa.Table.from_pylist(index, schema=_MASK_INDEX_SCHEMA)
        )
    )
    out.commit(
        files=files,
        counts={"input": len(samples), "output": len(samples), "quarantined": 0},
        class_names=list(class_names),
        class_space="custom",
        extra={"checkpoint_sha256": "0" * 64},
    )
    for image_id, defect in defects.items():  # listed and committed, then lost
        if defect == "missing_mask":
            loc.fs.rm_file(loc.join(f"masks/{image_id}.png"))
    return defects
