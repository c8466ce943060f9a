"""Image and label-map codecs of every stage: encoded bytes in, numpy arrays out, and back.

Untrusted bytes (input images, shard columns, mask files) are decoded here and nowhere else,
bounded by `MAX_PIXELS` (decompression bombs). Decoders that validate a row for quarantine
raise `RowRejected`; those the training stages use raise `ValueError`, which fails the run.
Label maps are palette PNGs whose pixel values are class ids (docs/CONTRACTS.md "Label maps");
VOC's palette interleaves the bits of i across R, G and B, most significant first.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from pipelines.io.class_spaces import ClassSpace
from pipelines.io.rows import RowRejected
from pipelines.io.schema import HEIGHT, IGNORE_INDEX, WIDTH

MAX_PIXELS = 50_000_000  # images and label maps declaring more are refused before decoding
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@cache
def _palette() -> tuple[int, ...]:
    colours: list[int] = []
    for index in range(256):
        rgb = [0, 0, 0]
        value = index
        for shift in range(7, -1, -1):  # low bits of the index go to the high bits of a channel
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours.extend(rgb)
    return tuple(colours)


def voc_palette() -> list[int]:
    """The 256-colour VOC palette as a flat [r0, g0, b0, r1, ...] list of 768 ints."""
    return list(_palette())


def encode_label_png(labels: np.ndarray) -> bytes:
    """A VOC-palette PNG whose pixel values are the H x W uint8 class ids `labels`."""
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"expected an H x W uint8 label map, got {labels.dtype} {labels.shape}")
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels).tobytes())
    image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """The H x W uint8 class ids of a palette (or greyscale) PNG label map (else ValueError)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"label PNG has mode {image.mode}, expected P or L")
        return np.array(image, dtype=np.uint8)


@contextlib.contextmanager
def _rejecting(prefix: str, errors: Any = _DECODE_ERRORS) -> Iterator[None]:
    """`errors` raised inside as `RowRejected("<prefix>: <type>: <error>")`."""
    try:
        yield
    except RowRejected:
        raise
    except errors as exc:
        raise RowRejected(f"{prefix}: {type(exc).__name__}: {exc}") from None


def decode_row_label_map(data: bytes, what: str, height: int, width: int) -> np.ndarray:
    """H x W uint8 class ids of a row's label-map PNG (ground truth, seed), sized as the row.

    Raises:
        RowRejected: undecodable, not single-channel, or another size than the row declares.
    """
    with _rejecting(f"undecodable {what}"):
        labels = decode_label_png(data)
    if labels.shape != (height, width):
        raise RowRejected(f"{what} is {labels.shape}, the row says {(height, width)}")
    return labels


def row_size(row: Mapping[str, Any], max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) a shard row declares.

    Raises:
        RowRejected: not positive integers, or more than `max_pixels` pixels.
    """
    height, width = row.get(HEIGHT), row.get(WIDTH)
    if not isinstance(height, int) or not isinstance(width, int) or height < 1 or width < 1:
        raise RowRejected(f"bad image size {height}x{width}")
    if height * width > max_pixels:
        raise RowRejected(f"image over pixel limit: {height}x{width} > {max_pixels} pixels")
    return height, width


def decode_row_gt(data: bytes, height: int, width: int, num_classes: int) -> np.ndarray:
    """`decode_row_label_map` of a row's ground truth, its ids in [0, K) or 255 (ignore).

    Raises:
        RowRejected: as `decode_row_label_map`, or class ids outside [0, `num_classes`).
    """
    gt = decode_row_label_map(data, "ground truth", height, width)
    valid = gt[gt != IGNORE_INDEX]
    if valid.size and int(valid.max()) >= num_classes:
        raise RowRejected(f"ground truth holds class ids outside [0, {num_classes})")
    return gt


def decode_labels(data: Any, what: str, expected: tuple[int, int] | None = None) -> np.ndarray:
    """H x W uint8 ids of a label PNG, its size checked against `expected` before decoding.

    Raises:
        RowRejected: not bytes, not a P/L PNG, undecodable, too large, or of another size.
    """
    if not isinstance(data, bytes):
        raise RowRejected(f"missing {what}")
    with _rejecting(f"undecodable {what}"), Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.mode not in ("P", "L"):
            raise RowRejected(
                f"undecodable {what}: {image.format} {image.mode}, expected a P/L label PNG"
            )
        shape = (image.height, image.width)
        if expected is not None and shape != tuple(expected):
            raise RowRejected(
                f"size mismatch: {what} is {shape[0]}x{shape[1]}, "
                f"expected {expected[0]}x{expected[1]}"
            )
        if shape[0] * shape[1] > MAX_PIXELS:
            raise RowRejected(f"{what} too large: {shape[0]}x{shape[1]}")
        return np.array(image, dtype=np.uint8)


def check_gt(data: bytes | None, *, height: int, width: int, space: ClassSpace) -> bytes | None:
    """Validates an optional ground-truth PNG (class ids, 255 = ignore); returns it as given."""
    if data is None:
        return None
    with _rejecting("cannot decode ground truth", Exception), Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG" or img.mode not in ("P", "L"):
            raise RowRejected(f"ground truth must be a P/L-mode PNG, got {img.format} {img.mode}")
        if img.size != (width, height):
            raise RowRejected(f"ground truth size {img.size} != image size {(width, height)}")
        ids = np.unique(np.asarray(img))
    bad = [int(i) for i in ids if i != IGNORE_INDEX and i >= space.num_classes]
    if bad:
        raise RowRejected(f"ground truth holds class ids {bad} outside the class space")
    return data


def decode_label_map(data: bytes, height: int, width: int) -> np.ndarray:
    """H x W uint8 class ids of an L or P PNG whose size must match the row (ValueError)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"label PNG must be single-channel (L or P), got mode {image.mode}")
        if image.width * image.height > MAX_PIXELS:
            raise ValueError("label map is too large")
        # P-mode PNGs hold class ids as palette indices: read the indices, not the colours.
        seed = np.array(image, dtype=np.uint8)
    if seed.shape != (height, width):
        raise ValueError(f"label map is {seed.shape}, the row says {(height, width)}")
    return seed


def decode_image_header(data: bytes | None, *, max_pixels: int) -> tuple[int, int]:
    """(height, width) of an untrusted encoded image: its header checked against
    `max_pixels` before any pixel is decoded, then decoded once to prove it is whole."""
    if data is None:
        raise RowRejected("missing image")
    if len(data) == 0:
        raise RowRejected("cannot decode image: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise RowRejected("zero-sized image")
                if width * height > max_pixels:
                    raise RowRejected(
                        f"image over pixel limit: {width}x{height} > {max_pixels} pixels"
                    )
                if img.format not in ("JPEG", "PNG"):
                    raise RowRejected(f"unsupported image format {img.format}")
                img.convert("RGB").load()
    except RowRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RowRejected(f"image over pixel limit: {exc}") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise RowRejected(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return height, width


def decode_rgb(data: bytes, *, height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8 (writable) from encoded image bytes whose size must match the row.

    Raises:
        RowRejected: undecodable, or another size than the row declares.
    """
    with _rejecting("undecodable image"), Image.open(io.BytesIO(data)) as image:
        if image.size != (width, height):
            raise RowRejected(
                f"image is {image.size[1]}x{image.size[0]}, the row says {height}x{width}"
            )
        return np.array(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8 RGB of encoded image bytes whose size must match the row (ValueError)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"image of {image.width} x {image.height} pixels is too large")
        rgb = np.asarray(image.convert("RGB"))
    if rgb.shape[:2] != (height, width):
        raise ValueError(f"image is {rgb.shape[:2]}, the row says {(height, width)}")
    return rgb


def decode_cam_column(data: bytes, num_planes: int, height: int, width: int) -> np.ndarray:
    """C x H x W float32 of the ingest shard's float16 `cam` bytes (ValueError: wrong size)."""
    expected = num_planes * height * width * 2
    if len(data) != expected:
        raise ValueError(f"cam column holds {len(data)} bytes, expected {expected}")
    return (
        np.frombuffer(data, dtype=np.float16).reshape(num_planes, height, width).astype(np.float32)
    )
