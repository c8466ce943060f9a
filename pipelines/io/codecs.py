"""The VOC colour palette and palette-PNG encoding/decoding of uint8 label maps.

Label maps (GT, seeds, pseudo masks) are stored as palette PNGs whose pixel values are class ids
(CONTRACTS.md "Label maps"); the palette only makes them viewable. VOC's palette gives class i
the colour whose bits interleave the bits of i across R, G and B, most significant first;
255 (ignore) is cream (224, 224, 192).
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image


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
    """A palette PNG (VOC palette) whose pixel values are the given class ids.

    Args:
        labels: H x W uint8 class ids, 255 = ignore.
    """
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"expected an H x W uint8 label map, got {labels.dtype} {labels.shape}")
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels).tobytes())
    image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """The H x W uint8 class ids of a palette (or greyscale) PNG label map.

    Raises:
        ValueError: the image is not a single-channel label map.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"label PNG has mode {image.mode}, expected P or L")
        return np.array(image, dtype=np.uint8)
