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


@contextlib.contextmanager
def _rejecting(prefix: str, errors: Any = _DECODE_ERRORS) -> Iterator[None]:
    """`errors` raised inside as `RowRejected("<prefix>: <type>: <error>")`."""
    try:
        yield
    except RowRejected:
        raise
    except errors as exc:
        raise RowRejected(f"{prefix}: {type(exc).__name__}: {exc}") from None


def decode_label_map(
    data: Any,
    what: str = "label map",
    shape: tuple[int, int] | None = None,
    *,
    num_classes: int | None = None,
) -> np.ndarray:
    """H x W uint8 class ids of a single-channel (P or L) label PNG: ground truth, a seed, a
    mask. Its header is checked against `MAX_PIXELS` and `shape` (the row's H x W) before any
    pixel is decoded; with `num_classes`, every id must lie in [0, K) or be 255 (ignore).

    Raises:
        RowRejected (a ValueError): missing, not a P/L PNG, undecodable, over the pixel limit,
            of another size than `shape`, or ids outside [0, `num_classes`).
    """
    if not isinstance(data, bytes):
        raise RowRejected(f"missing {what}")
    with _rejecting(f"undecodable {what}"), Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.mode not in ("P", "L"):
            raise RowRejected(
                f"undecodable {what}: {image.format} {image.mode}, expected a P/L label PNG"
            )
        size = (image.height, image.width)
        if size[0] * size[1] > MAX_PIXELS:
            raise RowRejected(f"{what} too large: {size[0]}x{size[1]}")
        if shape is not None and size != tuple(shape):
            raise RowRejected(
                f"size mismatch: {what} is {size[0]}x{size[1]}, expected {shape[0]}x{shape[1]}"
            )
        labels = np.array(image, dtype=np.uint8)  # P mode: the palette indices are the ids
    if num_classes is not None:
        bad = [int(i) for i in np.unique(labels) if i >= num_classes and i != IGNORE_INDEX]
        if bad:
            space = f"the class space [0, {num_classes})"
            raise RowRejected(f"{what} holds class ids {bad[:5]} outside {space}")
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


def decode_rgb(data: bytes, height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8 RGB (writable) of encoded image bytes whose size must match the row.

    Raises:
        RowRejected (a ValueError): undecodable, over `MAX_PIXELS`, or of another size.
    """
    with _rejecting("undecodable image"), Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_PIXELS:
            raise RowRejected(f"image too large: {image.height}x{image.width}")
        if image.size != (width, height):
            raise RowRejected(
                f"image is {image.size[1]}x{image.size[0]}, the row says {height}x{width}"
            )
        return np.array(image.convert("RGB"), dtype=np.uint8)


def decode_cam_column(data: bytes, num_planes: int, height: int, width: int) -> np.ndarray:
    """C x H x W float32 of the ingest shard's float16 `cam` bytes (ValueError: wrong size)."""
    expected = num_planes * height * width * 2
    if len(data) != expected:
        raise ValueError(f"cam column holds {len(data)} bytes, expected {expected}")
    planes = np.frombuffer(data, dtype=np.float16).reshape(num_planes, height, width)
    return planes.astype(np.float32)
