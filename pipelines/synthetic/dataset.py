"""Writes the synthetic dataset in a real layout, and plants bad inputs for ingest tests.

The MCTformer/WeakTr layout of docs/CONTRACTS.md under `root` of an fsspec filesystem:
`JPEGImages/<id>.jpg` (quality 90), `cams/<id>.npy` ({fg index: H x W float32}, or for layout
"clip-es" {"keys", "attn_highres": float16 K x H x W}), `SegmentationClassAug/<id>.png`,
`cls_labels.npy` (float32 multi-hot of the space's conventional length: VOC 20, COCO 90),
`classes.txt` (the whole class space) and, written last so that a directory without them is an
interrupted write, `train.txt` and `val.txt`.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import posixpath
import shlex
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipelines.io import schema
from pipelines.io.class_spaces import COCO91, VOC, ClassSpace
from pipelines.io.codecs import encode_label_png
from pipelines.io.safe_pickle import load_cls_labels
from pipelines.synthetic.camouflage import generate_camo_sample
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, Sample, generate_sample

Layout = Literal["mctformer", "clip-es"]
Family = Literal["shapes", "camouflage", "colours"]
FAMILIES: tuple[Family, ...] = ("shapes", "camouflage", "colours")
CAMO_CLASS_SPACES: dict[str, ClassSpace] = {"voc": VOC, "coco91": COCO91}
IMAGE_DIR = "JPEGImages"
CAM_DIR = "cams"
GT_DIR = "SegmentationClassAug"
CLS_LABELS = "cls_labels.npy"
CLASSES_TXT = "classes.txt"
JPEG_QUALITY = 90

# kind -> (image id, keyword that ingest's quarantine reason for that row must contain,
# case-insensitively). Ingest checks the image before its CAM and its label vector.
BAD_INPUTS: dict[str, tuple[str, str]] = {
    "truncated_cam": ("bad_truncated_cam", "truncated"),
    "not_npy_cam": ("bad_not_npy_cam", "npy"),
    "malicious_cam": ("bad_malicious_cam", "unsafe"),
    "nonfinite_cam": ("bad_nonfinite_cam", "finite"),
    "cam_shape": ("bad_cam_shape", "shape"),
    "cam_class": ("bad_cam_class", "cam class"),
    "empty_labels": ("bad_empty_labels", "empty"),
    "missing_image": ("bad_missing_image", "missing"),
    "undecodable_image": ("bad_undecodable_image", "decode"),
    "label_length": ("bad_label_length", "length"),
    "duplicate_id": ("bad_duplicate_id", "duplicate"),
    "path_traversal": ("../../etc/passwd", "image id"),
    "pixel_limit": ("bad_pixel_limit", "pixel"),
}
_WRITE_BATCH = 48  # files handed to fs.pipe at once (~16 samples, ~25 MB at the default size)
_BOMB_SIDE = 16384  # 268M pixels: past PIL's own bomb error (2 x 89M), ~35 kB as a 1-bit PNG


@dataclass(frozen=True)
class WrittenDataset:
    """What `write_dataset` wrote: ids per split and the class names."""

    root: str
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    class_names: tuple[str, ...]


def _npy_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)  # writing side: these files are ours
    return buffer.getvalue()


def _image_bytes(image: np.ndarray, format: str = "JPEG") -> bytes:
    """The image as a JPEG (quality JPEG_QUALITY), or as a PNG with `format="PNG"`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format, quality=JPEG_QUALITY)
    return buffer.getvalue()


def cam_file_bytes(cams: dict[int, np.ndarray], layout: Layout) -> bytes:
    """The `.npy` bytes of one image's CAMs ({foreground index: H x W float32 in [0, 1]}):
    the dict itself ("mctformer") or keys + a float16 K x H x W stack ("clip-es")."""
    if layout == "mctformer":
        return _npy_bytes({int(k): v.astype(np.float32) for k, v in cams.items()})
    if layout == "clip-es":
        keys = np.array(sorted(cams), dtype=np.int64)
        planes = [cams[int(k)] for k in keys]
        stack = np.stack(planes) if planes else np.zeros((0, 1, 1), np.float32)
        return _npy_bytes({"keys": keys, "attn_highres": stack.astype(np.float16)})
    raise ValueError(f"layout: expected 'mctformer' or 'clip-es', got {layout!r}")


def multihot(labels: Iterable[int], num_foreground: int) -> np.ndarray:
    """float32 multi-hot vector (num_foreground,) with entry class id - 1 set per label."""
    vector = np.zeros(num_foreground, np.float32)
    vector[np.asarray(list(labels), dtype=np.int64) - 1] = 1.0
    return vector


def _encode_one(index: int, draw: Callable[[int], Sample], layout: Layout) -> tuple[Any, ...]:
    """Sample `index` (`draw(index)`): its id, {path: bytes} of its files and its labels."""
    sample = draw(index)
    files = {
        f"{IMAGE_DIR}/{sample.image_id}.jpg": _image_bytes(sample.image),
        f"{CAM_DIR}/{sample.image_id}.npy": cam_file_bytes(sample.cams, layout),
        f"{GT_DIR}/{sample.image_id}.png": encode_label_png(sample.gt),
    }
    return sample.image_id, files, sample.labels


def _encoded(
    draw: Callable[[int], Sample], layout: Layout, count: int, workers: int
) -> Iterator[tuple[Any, ...]]:
    encode = partial(_encode_one, draw=draw, layout=layout)
    if workers <= 1 or count < 8:
        yield from map(encode, range(count))
        return
    # spawn: the caller may hold threads (Ray, s3fs) that fork would copy mid-flight
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(encode, range(count), chunksize=4)


def _put(fs: Any, root: str, relative: str, data: bytes) -> None:
    fs.pipe_file(posixpath.join(root, relative), data)


def write_dataset(
    fs: Any,
    root: str,
    *,
    num_images: int,
    seed: int,
    height: int = 320,
    width: int = 448,
    val_fraction: float = 0.25,
    layout: Layout = "mctformer",
    workers: int = 2,
    family: Family = "shapes",
    classes: str | None = None,
) -> WrittenDataset:
    """Generates `num_images` samples and writes them in the MCTformer/WeakTr layout.

    The bytes written depend only on the arguments other than `fs`, `root` and `workers`.

    Args:
        fs, root: an fsspec filesystem (local, s3, memory) and the dataset directory in it.
        num_images, seed: N >= 1 and the dataset seed.
        height, width: H x W of every image (shapes only: the other families draw VOC-like
            sizes per image).
        val_fraction: share of the images listed in val.txt (chosen by the seed), in [0, 1).
        layout: CAM file format, "mctformer" or "clip-es".
        workers: processes generating samples (1 = in this process).
        family: "shapes" (six custom classes, colour tells them apart), "camouflage"
            (shape and texture only, in a real class space) or "colours" (the camouflage
            scenes with one colour per class).
        classes: camouflage and colours only: "voc" (default) or "coco91"; None for shapes.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {list(FAMILIES)}, got {family!r}")
    if family == "shapes" and classes is not None:
        raise ValueError("classes: only the camouflage and colours families take a class space")
    if family != "shapes":
        classes = "voc" if classes is None else classes
        if classes not in CAMO_CLASS_SPACES:
            raise ValueError(f"classes: expected one of {list(CAMO_CLASS_SPACES)}, got {classes!r}")
    space = SYNTHETIC_CLASSES if classes is None else CAMO_CLASS_SPACES[classes]
    if num_images < 1:
        raise ValueError("num_images must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    if layout not in ("mctformer", "clip-es"):
        raise ValueError(f"layout: expected 'mctformer' or 'clip-es', got {layout!r}")
    for directory in (IMAGE_DIR, CAM_DIR, GT_DIR):
        fs.makedirs(posixpath.join(root, directory), exist_ok=True)
    num_foreground = space.num_classes - 1  # VOC 20, COCO 90 (category-id space), shapes 6
    labels: dict[str, np.ndarray] = {}
    pending: dict[str, bytes] = {}
    if classes is None:
        draw = partial(generate_sample, seed=seed, height=height, width=width)
    else:
        colours = family == "colours"
        draw = partial(generate_camo_sample, seed=seed, class_space=space, class_colours=colours)
    for image_id, files, sample_labels in _encoded(draw, layout, num_images, workers):
        pending.update({posixpath.join(root, rel): data for rel, data in files.items()})
        labels[image_id] = multihot(sample_labels, num_foreground)
        if len(pending) >= _WRITE_BATCH:
            fs.pipe(pending)  # concurrent puts on async filesystems (s3fs)
            pending = {}
    if pending:
        fs.pipe(pending)
    ids = list(labels)
    num_val = math.floor(num_images * val_fraction)
    order = np.random.default_rng([seed, 2**31]).permutation(num_images)
    val_ids = tuple(sorted(ids[i] for i in order[:num_val]))
    train_ids = tuple(i for i in ids if i not in set(val_ids))
    _put(fs, root, CLS_LABELS, _npy_bytes(labels))
    _put(fs, root, CLASSES_TXT, ("\n".join(space.class_names) + "\n").encode())
    _put(fs, root, "val.txt", "".join(f"{i}\n" for i in val_ids).encode())
    _put(fs, root, "train.txt", "".join(f"{i}\n" for i in train_ids).encode())
    return WrittenDataset(root, train_ids, val_ids, space.class_names)


class _RunsCommand:
    """Pickles as a call of os.system: what a malicious CAM file carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def pixel_bomb_png(side: int = _BOMB_SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels that is only kilobytes on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1 bit, grey, no interlace
    compressor = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed zero pixels
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def _cam_variant(kind: str, sample: Sample, layout: Layout, sentinel: str) -> bytes:
    """CAM file bytes for a bad row (valid ones for kinds whose defect lies elsewhere)."""
    good = cam_file_bytes(sample.cams, layout)
    if kind == "truncated_cam":
        return good[: len(good) // 2]
    if kind == "not_npy_cam":
        return _image_bytes(sample.image)
    if kind == "malicious_cam":
        return _npy_bytes({0: _RunsCommand(f"touch {shlex.quote(sentinel)}")})
    cams = dict(sample.cams)
    first = min(cams)
    if kind == "nonfinite_cam":
        cams[first] = cams[first].copy()
        cams[first][0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    elif kind == "cam_shape":
        cams = {k: v[:-8] for k, v in cams.items()}
    elif kind == "cam_class":
        unlabelled = next(k for k in range(len(SYNTHETIC_CLASSES.class_names) - 1) if k not in cams)
        cams[unlabelled] = cams[first]
    elif kind == "pixel_limit":
        cams = {k: v[:8, :8] for k, v in cams.items()}
    elif kind == "empty_labels":  # no label, so no CAM plane: the empty vector is the defect
        cams = {}
    return cam_file_bytes(cams, layout)


def plant_bad_inputs(
    fs: Any,
    root: str,
    *,
    kinds: Sequence[str] | None = None,
    sentinel_path: str | None = None,
    layout: Layout = "mctformer",
) -> dict[str, str]:
    """Adds one defective row per kind (keys of BAD_INPUTS, default all) to the train split of
    a shapes dataset written by `write_dataset` in `layout`.

    Each bad row is a valid 96 x 128 sample (seed 0) but for its one defect, appended to
    train.txt and cls_labels.npy. Nothing is written outside `root` (the path-traversal row is
    only a name). `sentinel_path`: the local file the malicious CAM would create if its pickle
    ever ran (default: a fixed name in the temp directory).

    Returns:
        {image id: keyword its quarantine reason must contain (case-insensitive)}.
    """
    kinds = list(BAD_INPUTS) if kinds is None else list(kinds)
    unknown = sorted(set(kinds) - set(BAD_INPUTS))
    if unknown:
        raise ValueError(f"kinds: unknown {unknown}; expected some of {list(BAD_INPUTS)}")
    sentinel = sentinel_path or os.path.join(tempfile.gettempdir(), "weakclip-malicious-cam-ran")
    labels = load_cls_labels(fs.cat_file(posixpath.join(root, CLS_LABELS)))
    num_foreground = SYNTHETIC_CLASSES.num_classes - 1
    split = fs.cat_file(posixpath.join(root, "train.txt")).decode().splitlines()
    expected: dict[str, str] = {}
    for offset, kind in enumerate(kinds):
        image_id, keyword = BAD_INPUTS[kind]
        expected[image_id] = keyword
        split.append(image_id)
        sample = generate_sample(10**6 + offset, seed=0, height=96, width=128)
        vector = multihot(sample.labels, num_foreground)
        if kind == "empty_labels":
            vector[:] = 0
        elif kind == "label_length":
            vector = np.concatenate([vector, [0.0]]).astype(np.float32)
        labels[image_id] = vector
        if kind == "path_traversal":
            continue
        image_path = f"{IMAGE_DIR}/{image_id}.jpg"
        if kind == "undecodable_image":
            _put(fs, root, image_path, b"\xff\xd8\xff\xe0 this is not a JPEG " + bytes(64))
        elif kind == "pixel_limit":
            _put(fs, root, f"{IMAGE_DIR}/{image_id}.png", pixel_bomb_png())
        elif kind != "missing_image":
            _put(fs, root, image_path, _image_bytes(sample.image))
        if kind == "duplicate_id":
            _put(fs, root, f"{IMAGE_DIR}/{image_id}.png", _image_bytes(sample.image, "PNG"))
            split.append(image_id)
        _put(fs, root, f"{CAM_DIR}/{image_id}.npy", _cam_variant(kind, sample, layout, sentinel))
        _put(fs, root, f"{GT_DIR}/{image_id}.png", encode_label_png(sample.gt))
    _put(fs, root, CLS_LABELS, _npy_bytes(labels))
    _put(fs, root, "train.txt", "".join(f"{i}\n" for i in split).encode())
    return expected


def ingest_row(sample: Sample, *, split: str | None, source: str | None = None) -> dict[str, Any]:
    """The ingest-shard row (schema.INGEST_COLUMNS) of a synthetic sample, without the files:
    for tests and benchmarks of later stages that need ingest output without running ingest."""
    classes = sorted(c + 1 for c in sample.cams)
    planes = np.stack([sample.cams[c - 1] for c in classes]).astype(np.float16)
    height, width = sample.gt.shape
    return {
        schema.IMAGE_ID: sample.image_id,
        schema.IMAGE: _image_bytes(sample.image),
        schema.HEIGHT: height,
        schema.WIDTH: width,
        schema.LABELS: list(sample.labels),
        schema.CAM: np.ascontiguousarray(planes).tobytes(),
        schema.CAM_CLASSES: classes,
        schema.GT: encode_label_png(sample.gt),
        schema.SOURCE: source or f"{CAM_DIR}/{sample.image_id}.npy",
        schema.SPLIT: split,
    }
