"""Training augmentation and evaluation preprocessing on numpy arrays (docs/METHOD.md).

The training chain reproduces the one the released WeakCLIP config ran through mmseg 0.x, in
the same order: random rescale → random crop with the category-ratio rule → horizontal flip →
photometric distortion → mean/std normalisation → pad to the crop size. Every random decision
draws from the caller's `numpy.random.Generator`, so a sample is a pure function of
(image, seed labels, rng state, config) and the training job controls reproducibility.

Rescale rule (mmseg `Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)`):
draw r ~ U(ratio_range), set the bound (long_max, short_max) = (int(2048·r), int(512·r)) and
scale the image by f = min(long_max / long_side, short_max / short_side), new side =
int(side·f + 0.5). For ordinary photos (aspect < 4) the short side therefore becomes ≈ 512·r;
the long bound only bites on panoramas. Images resample bilinearly (PIL, antialiased when
shrinking; mmseg used OpenCV without antialiasing), labels with nearest neighbour so a label map
only ever holds ids from its input, plus 255 from padding.

Padding happens after normalisation, as in mmseg: padded image pixels are exactly 0 in the
normalised space (the mean colour), which is also what the sliding-window inference pads with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.io.schema import IGNORE_INDEX
from weakclip.config import check_fields

RGB = tuple[float, float, float]
IMAGENET_MEAN: RGB = (123.675, 116.28, 103.53)  # RGB, 0–255 scale
IMAGENET_STD: RGB = (58.395, 57.12, 57.375)

# PIL stores hue on 0..255 for the full circle; OpenCV (whose units mmseg's hue_delta uses)
# stores it on 0..179.
_PIL_HUE_PER_CV2_HUE = 256.0 / 180.0


def row_seed(seed: int, epoch: int, image_id: str) -> list[int]:
    """Entropy for one row's augmentation: (global seed, epoch, stable hash of the image id)."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return [int(seed), int(epoch), int.from_bytes(digest[:8], "little")]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation settings; defaults are the paper's VOC/COCO recipe."""

    crop_size: int = 512  # side of the square training crop
    resize_scale: tuple[int, int] = (2048, 512)  # (long-side bound, short-side bound) at ratio 1
    ratio_range: tuple[float, float] = (0.5, 2.0)  # uniform range of the rescale ratio
    cat_max_ratio: float = 0.75  # a crop is accepted when its largest class is < this share
    crop_attempts: int = 10  # crops tried for the category-ratio rule before taking the last
    flip_prob: float = 0.5  # probability of a horizontal flip
    photometric: bool = True  # apply mmseg-style photometric distortion
    brightness_delta: int = 32  # additive brightness shift drawn from U(-delta, delta)
    contrast_range: tuple[float, float] = (0.5, 1.5)  # multiplicative contrast factor
    saturation_range: tuple[float, float] = (0.5, 1.5)  # factor on the HSV saturation channel
    hue_delta: int = 18  # hue shift in OpenCV units (0..179 circle), i.e. ±36 degrees
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel RGB mean on 0–255
    std: tuple[float, float, float] = IMAGENET_STD  # per-channel RGB std on 0–255

    def __post_init__(self) -> None:
        check_fields(self, ">= 1", "crop_size", "crop_attempts")
        check_fields(self, "in [0, 1]", "flip_prob")
        if len(self.resize_scale) != 2 or min(self.resize_scale) <= 0:
            raise ValueError(f"resize_scale must be two positive ints, got {self.resize_scale}")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.brightness_delta <= 255:
            raise ValueError(f"brightness_delta must be in [0, 255], got {self.brightness_delta}")
        for name in ("contrast_range", "saturation_range"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must satisfy 0 <= low <= high, got {(low, high)}")
        if not 0 <= self.hue_delta <= 90:
            raise ValueError(f"hue_delta must be in [0, 90], got {self.hue_delta}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have three (RGB) entries")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def of(cls, train: Any, *, crop_size: int, short_side: int, **more: Any) -> AugmentConfig:
        """`crop_size` crops of images rescaled about `short_side` (long side bound 4x), with a
        training config's `ratio_range`, `cat_max_ratio`, `flip_prob` and `photometric`."""
        return cls(
            crop_size=crop_size,
            resize_scale=(4 * short_side, short_side),
            ratio_range=tuple(train.ratio_range),
            cat_max_ratio=train.cat_max_ratio,
            flip_prob=train.flip_prob,
            photometric=train.photometric,
            **more,
        )


def augment_sample(
    image: np.ndarray, seed_labels: np.ndarray, *, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The random training augmentation of an H x W x 3 uint8 RGB image and its H x W uint8
    labels (255 = ignore), every draw from `rng`: the normalised 3 x S x S float32 crop
    (S = crop_size) and S x S uint8 labels (ids from `seed_labels`, 255 where padded)."""
    _check_pair(image, seed_labels)
    image, seed_labels = _random_rescale(image, seed_labels, rng=rng, config=config)
    top, left = _choose_crop(seed_labels, rng=rng, config=config)
    size = config.crop_size
    image = image[top : top + size, left : left + size]
    seed_labels = seed_labels[top : top + size, left : left + size]
    if rng.random() < config.flip_prob:
        image = image[:, ::-1]
        seed_labels = seed_labels[:, ::-1]
    if config.photometric:
        image = photometric_distortion(image, rng=rng, config=config)
    return _normalize_and_pad(image, seed_labels, size=size, mean=config.mean, std=config.std)


def photometric_distortion(
    image: np.ndarray, *, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """mmseg `PhotoMetricDistortion`: brightness, contrast, saturation, hue, each with p=0.5.

    Contrast goes either right after brightness or last (a coin flip), as in mmseg. Brightness
    adds a constant and contrast multiplies (no blending with the mean); saturation scales the
    HSV S channel and hue rotates the HSV H channel. Every step saturates to 0..255 and
    truncates to uint8, as mmseg does. H x W x 3 uint8 RGB in, a new H x W x 3 uint8 out.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    if rng.integers(2):
        delta = rng.uniform(-config.brightness_delta, config.brightness_delta)
        out = _value_map(lambda v: _saturate(v + delta))[out]
    contrast_last = bool(rng.integers(2))
    if not contrast_last:
        out = _random_contrast(out, rng=rng, config=config)
    if rng.integers(2):
        factor = rng.uniform(*config.saturation_range)
        out = _in_hsv(out, 1, _value_map(lambda s: _saturate(s * factor)))
    if rng.integers(2):
        shift_cv2 = int(rng.integers(-config.hue_delta, config.hue_delta + 1))
        shift = round(shift_cv2 * _PIL_HUE_PER_CV2_HUE)
        out = _in_hsv(out, 0, (np.arange(256, dtype=np.int32) + shift) % 256)
    if contrast_last:
        out = _random_contrast(out, rng=rng, config=config)
    return out


def normalize(
    image: np.ndarray, *, mean: RGB = IMAGENET_MEAN, std: RGB = IMAGENET_STD
) -> np.ndarray:
    """(image − mean) / std per RGB channel (0–255 scale): H x W x 3 uint8 → 3 x H x W float32."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
    if image.dtype != np.uint8:
        mean_arr = np.asarray(mean, dtype=np.float32)
        out = (image.astype(np.float32) - mean_arr) / np.asarray(std, dtype=np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))
    out = np.empty((3, *image.shape[:2]), dtype=np.float32)
    _normalize_into(out, image, mean=mean, std=std)
    return out


def denormalize(
    image: np.ndarray, *, mean: RGB = IMAGENET_MEAN, std: RGB = IMAGENET_STD
) -> np.ndarray:
    """Inverts `normalize`: 3 x H x W float → H x W x 3 uint8 RGB (rounded, clipped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be 3 x H x W, got shape {image.shape}")
    rgb = image.transpose(1, 2, 0).astype(np.float32) * np.asarray(std, dtype=np.float32)
    rgb += np.asarray(mean, dtype=np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def prepare_eval_image(
    image: np.ndarray,
    *,
    short_side: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """Deterministic preprocessing for inference: optional rescale, then normalise.

    H x W x 3 uint8 RGB → 3 x H' x W' float32; with `short_side`, rescaled (bilinear, aspect
    kept, new side = int(side·f + 0.5)) so that the short side has that length.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
    if short_side is not None:
        if short_side <= 0:
            raise ValueError(f"short_side must be positive, got {short_side}")
        height, width = image.shape[:2]
        factor = short_side / min(height, width)
        size = (_scaled(width, factor), _scaled(height, factor))
        image = _resize(image, size=size, resample=Image.Resampling.BILINEAR)
    return normalize(image, mean=mean, std=std)


def _check_pair(image: np.ndarray, labels: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"seed_labels must be H x W uint8, got {labels.dtype} {labels.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    if min(labels.shape) == 0:
        raise ValueError("empty image")


def _scaled(side: int, factor: float) -> int:
    return max(1, int(side * factor + 0.5))


def _resize(array: np.ndarray, *, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize an H x W (x 3) uint8 array to size = (width, height) with PIL."""
    if (array.shape[1], array.shape[0]) == size:
        return array
    return np.array(Image.fromarray(np.ascontiguousarray(array)).resize(size, resample=resample))


def _random_rescale(
    image: np.ndarray, labels: np.ndarray, *, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    ratio = rng.uniform(*config.ratio_range)
    long_bound = int(max(config.resize_scale) * ratio)
    short_bound = int(min(config.resize_scale) * ratio)
    height, width = labels.shape
    factor = min(long_bound / max(height, width), short_bound / min(height, width))
    size = (_scaled(width, factor), _scaled(height, factor))
    image = _resize(image, size=size, resample=Image.Resampling.BILINEAR)
    labels = _resize(labels, size=size, resample=Image.Resampling.NEAREST)
    return image, labels


def _choose_crop(
    labels: np.ndarray, *, rng: np.random.Generator, config: AugmentConfig
) -> tuple[int, int]:
    """Top-left corner of the crop, with mmseg's category-ratio rule.

    A crop is accepted when it holds at least two labelled classes and the largest covers less
    than `cat_max_ratio` of its labelled (≠ 255) pixels. After `crop_attempts` rejected crops
    the last one is kept, so an image that cannot satisfy the rule still trains.
    """
    size = config.crop_size
    height, width = labels.shape
    top = left = 0
    for _ in range(config.crop_attempts):
        top = int(rng.integers(0, max(height - size, 0) + 1))
        left = int(rng.integers(0, max(width - size, 0) + 1))
        if config.cat_max_ratio >= 1:
            break
        crop = labels[top : top + size, left : left + size]
        counts = np.bincount(crop.ravel(), minlength=256)
        counts[IGNORE_INDEX] = 0
        present = counts[counts > 0]
        if present.size > 1 and present.max() < config.cat_max_ratio * present.sum():
            break
    return top, left


def _saturate(values: np.ndarray) -> np.ndarray:
    # mmseg clips then casts with astype, which truncates toward zero.
    return np.clip(values, 0, 255).astype(np.uint8)


def _value_map(change: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`change` (float32 in, uint8 out) of every uint8 value, as a 256-entry table: indexing
    with the table gives exactly what `change(image.astype(float32))` gives, per pixel, for a
    fraction of the work."""
    return change(np.arange(256, dtype=np.float32))


def _normalize_into(out: np.ndarray, image: np.ndarray, *, mean: RGB, std: RGB) -> None:
    """`out[c] = (image[..., c] - mean[c]) / std[c]` in float32, through one 256-entry table per
    channel (bit for bit what the arithmetic on every pixel gives)."""
    values = np.arange(256, dtype=np.float32)
    for c in range(3):
        table = (values - np.float32(mean[c])) / np.float32(std[c])
        out[c] = table[image[..., c]]


def _in_hsv(rgb: np.ndarray, channel: int, table: np.ndarray) -> np.ndarray:
    """`rgb` with one channel of its HSV form (PIL's 0..255 units) mapped through a 256-entry
    `table`."""
    hsv = np.array(Image.fromarray(rgb).convert("HSV"))
    hsv[..., channel] = table.astype(np.uint8)[hsv[..., channel]]
    height, width = hsv.shape[:2]
    image = Image.frombytes("HSV", (width, height), np.ascontiguousarray(hsv).tobytes())
    return np.array(image.convert("RGB"))


def _random_contrast(
    image: np.ndarray, *, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    if rng.integers(2):
        factor = rng.uniform(*config.contrast_range)
        return _value_map(lambda v: _saturate(v * factor))[image]
    return image


def _normalize_and_pad(
    image: np.ndarray, labels: np.ndarray, *, size: int, mean: RGB, std: RGB
) -> tuple[np.ndarray, np.ndarray]:
    """The normalised image and its labels padded bottom/right to `size`: the image with 0
    (normalised space), the labels with 255."""
    height, width = labels.shape
    padded_image = np.zeros((3, size, size), dtype=np.float32)
    if (height, width) == (size, size):
        _normalize_into(padded_image, image, mean=mean, std=std)
    else:
        padded_image[:, :height, :width] = normalize(image, mean=mean, std=std)
    padded_labels = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    padded_labels[:height, :width] = labels
    return padded_image, padded_labels
