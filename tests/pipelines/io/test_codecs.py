"""The codecs share one pixel limit: every decoder refuses a larger image before decoding it."""

from __future__ import annotations

import zlib

import pytest

from pipelines.ingest import IngestConfig
from pipelines.ingest.rows import RowLimits
from pipelines.io.codecs import (
    MAX_PIXELS,
    decode_image_header,
    decode_label_map,
    decode_rgb,
)
from pipelines.io.rows import RowRejected
from pipelines.pseudo_masks.rows import RowSpec

SIDE = 8_000  # 64M pixels: over MAX_PIXELS, under PIL's own decompression-bomb threshold


def _png_header(side: int) -> bytes:
    """An 8-bit greyscale PNG declaring side x side pixels; its pixel data is never read."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(bytes(1 + side))  # one row: the image is truncated, never decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)


def test_every_decoder_refuses_an_image_over_the_pixel_limit() -> None:
    assert SIDE * SIDE > MAX_PIXELS
    data = _png_header(SIDE)
    with pytest.raises(RowRejected, match="too large"):
        decode_rgb(data, SIDE, SIDE)
    with pytest.raises(RowRejected, match="too large"):
        decode_label_map(data, "mask", (SIDE, SIDE))
    with pytest.raises(RowRejected, match="too large"):
        decode_label_map(data)  # with no size to check against
    with pytest.raises(RowRejected, match="pixel limit"):
        decode_image_header(data, max_pixels=MAX_PIXELS)


def test_stage_limits_default_to_the_one_pixel_limit() -> None:
    assert RowLimits().max_pixels == MAX_PIXELS
    assert IngestConfig().max_pixels == MAX_PIXELS
    assert RowSpec(num_classes=2, input_stage="ingest", splits=None).max_pixels == MAX_PIXELS
