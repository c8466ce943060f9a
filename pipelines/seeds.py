"""CAM -> seed labels: a background plane, argmax, then a dense CRF (docs/METHOD.md). Pure numpy.

`weaktr` (WeakTr / MCTformer): a constant background plane at `bg_threshold`, argmax, then a CRF
whose unary comes from those hard labels (label 0 is background, a real class, not "unknown").
`clip-es` (CLIP-ES): background = (1 - max cam) ** bg_power, a softmax unary, and pixels whose
CRF confidence is below `confidence_threshold` set to 255 (ignore). Only background and the
image's classes enter the CRF (`restrict_to_present`), several times cheaper than all classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np
from pydensecrf.utils import unary_from_labels

from pipelines.io.schema import IGNORE_INDEX
from weakclip.config import CRFConfig
from weakclip.crf import crf_inference, dense_crf

Method = Literal["weaktr", "clip-es"]
METHODS: tuple[str, ...] = ("weaktr", "clip-es")

# CAM values may overshoot [0, 1] by rounding (float16 storage); beyond this they are refused.
_CAM_RANGE_SLACK = 1e-3

# SeedConfig's numeric fields, checked in this order: (names, test, what they must be).
_FIELD_CHECKS: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("bg_threshold",), lambda x: 0 < x < 1, "in (0, 1)"),
    (("bg_power",), lambda x: x > 0, "positive"),
    (("iterations",), lambda x: int(x) == x and x >= 0, "a non-negative integer"),
    (("gt_prob",), lambda x: 0 < x < 1, "in (0, 1)"),
    (("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"), lambda x: x > 0, "positive"),
    (("gaussian_compat", "bilateral_compat"), lambda x: x >= 0, "non-negative"),
    (("confidence_threshold",), lambda x: 0 < x <= 1, "in (0, 1]"),
    (("prob_floor",), lambda x: 0 < x < 1, "in (0, 1)"),
)


@dataclass(frozen=True)
class SeedConfig:
    """How CAMs become seed labels. Defaults: WeakTr's VOC recipe; `for_method` for others."""

    method: Method = "weaktr"  # "weaktr" (label unary) or "clip-es" (softmax unary + ignore)
    bg_threshold: float = 0.43  # weaktr background plane (WeakTr VOC 0.43, COCO 0.42)
    bg_power: float = 1.0  # clip-es background = (1 - max cam) ** bg_power (alpha)
    iterations: int = 10  # mean-field iterations
    gt_prob: float = 0.7  # weaktr: probability given to the argmax label in the unary
    gaussian_sxy: float = 4  # smoothness kernel spatial std (pixels)
    gaussian_compat: float = 3  # smoothness kernel weight
    bilateral_sxy: float = 83  # appearance kernel spatial std (pixels)
    bilateral_srgb: float = 5  # appearance kernel colour std
    bilateral_compat: float = 3  # appearance kernel weight
    confidence_threshold: float = 0.95  # clip-es: CRF confidence below this -> 255
    prob_floor: float = 1e-5  # clip-es: unary clamp (pydensecrf's unary_from_softmax default)
    restrict_to_present: bool = True  # CRF over background + CAM classes only
    num_classes: int | None = None  # class-space size; needed when restrict_to_present=False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for names, ok, what in _FIELD_CHECKS:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ValueError(f"{name} must be {what}, got {getattr(self, name)}")
        if self.num_classes is not None and not 2 <= self.num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in [2, 255], got {self.num_classes}")
        if not self.restrict_to_present and self.num_classes is None:
            raise ValueError("num_classes is required when restrict_to_present is False")

    @classmethod
    def for_method(cls, method: Method, **overrides: object) -> SeedConfig:
        """The published CRF parameters of `method` (weaktr: Gaussian 4/3, bilateral 83/5/3
        (VOC); clip-es: Gaussian 1/3, bilateral 67/3/4), with any field overridden."""
        base = cls(method=method)
        if method == "clip-es":
            base = replace(
                base, gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                bilateral_compat=4,
            )  # fmt: skip
        return replace(base, **overrides)  # type: ignore[arg-type]

    def crf_params(self) -> dict[str, float]:
        return crf_kwargs(self)


CRF_KWARGS = tuple(f.name for f in fields(CRFConfig))  # iterations, gaussian_*, bilateral_*


def crf_kwargs(params: Any) -> dict[str, float]:
    """The dense-CRF keyword arguments (`weakclip.crf.dense_crf` and the boundary CRF) of any
    settings object with those fields: a `SeedConfig`, a `weakclip.config.CRFConfig`."""
    return {name: getattr(params, name) for name in CRF_KWARGS}


def _check_cams(cams: np.ndarray) -> np.ndarray:
    if not isinstance(cams, np.ndarray) or not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"cams must be a float numpy array, got {getattr(cams, 'dtype', cams)}")
    if cams.ndim != 3 or cams.shape[1] < 1 or cams.shape[2] < 1:
        raise ValueError(f"cams must be C x H x W, got shape {cams.shape}")
    cams = cams.astype(np.float32, copy=False)
    if not cams.size:
        return cams
    low, high = float(cams.min()), float(cams.max())  # NaN if any is, and ±inf show here
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("cams hold non-finite values")
    if low < -_CAM_RANGE_SLACK or high > 1 + _CAM_RANGE_SLACK:
        raise ValueError(f"cams must be normalised to [0, 1], got [{low:.4g}, {high:.4g}]")
    return np.clip(cams, 0.0, 1.0) if low < 0 or high > 1 else cams


def _check_classes(
    cam_classes: Sequence[int] | np.ndarray, num_planes: int, num_classes: int | None
) -> np.ndarray:
    classes = np.asarray(cam_classes)
    if classes.ndim != 1 or len(classes) != num_planes:
        raise ValueError(f"cam_classes must list one class id per CAM plane ({num_planes})")
    if classes.size and classes.dtype.kind not in "iu":
        raise ValueError(f"cam_classes must be integers, got {classes.dtype}")
    classes = classes.astype(np.int64)
    upper = (num_classes if num_classes is not None else IGNORE_INDEX) - 1
    if classes.size and (classes.min() < 1 or classes.max() > upper):
        raise ValueError(f"cam_classes must be foreground ids in [1, {upper}], got {classes}")
    if len(np.unique(classes)) != len(classes):
        raise ValueError(f"cam_classes repeat a class: {classes}")
    return classes


def _check_image(image: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {getattr(image, 'dtype', image)}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 RGB, got shape {image.shape}")
    if image.shape[:2] != shape:
        raise ValueError(f"image is {image.shape[:2]} but the CAMs are {shape}")


def cam_to_probabilities(
    cams: np.ndarray,
    *,
    method: Method = "weaktr",
    bg_threshold: float = 0.43,
    bg_power: float = 1.0,
) -> np.ndarray:
    """(1 + C) x H x W float32: a background plane (0) + C x H x W CAM planes in [0, 1],
    normalised to sum to 1 per pixel (which changes neither the argmax nor, up to the unary
    floor, a softmax-unary CRF). The background is `bg_threshold` under "weaktr" (MCTformer PSA
    0.39, WeakTr 0.43 VOC / 0.42 COCO), (1 - max_c cam) ** `bg_power` under "clip-es"."""
    cams = _check_cams(cams)
    if method == "weaktr":
        if not 0 < bg_threshold < 1:
            raise ValueError(f"bg_threshold must be in (0, 1), got {bg_threshold}")
        background = np.full((1,) + cams.shape[1:], bg_threshold, np.float32)
    elif method == "clip-es":
        if not bg_power > 0:
            raise ValueError(f"bg_power must be positive, got {bg_power}")
        peak = cams.max(axis=0, keepdims=True) if len(cams) else np.zeros((1,) + cams.shape[1:])
        background = np.power(1.0 - peak, bg_power).astype(np.float32)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    planes = np.concatenate([background, cams])  # (1 + C) x H x W
    # Positive: weaktr's plane is > 0, and under clip-es background + max cam >= 1 - max + max.
    return planes / planes.sum(axis=0, keepdims=True)


def cam_argmax(
    cams: np.ndarray, cam_classes: Sequence[int] | np.ndarray, *, bg_threshold: float = 0.43
) -> np.ndarray:
    """The unrefined baseline: H x W uint8 argmax (ids in {0} ∪ `cam_classes`, the planes' C
    foreground ids) over a background plane at `bg_threshold` (ties go to it) and the C x H x W
    CAMs in [0, 1]."""
    cams = _check_cams(cams)
    classes = _check_classes(cam_classes, cams.shape[0], None)
    if not 0 < bg_threshold < 1:
        raise ValueError(f"bg_threshold must be in (0, 1), got {bg_threshold}")
    background = np.full((1,) + cams.shape[1:], bg_threshold, np.float32)
    lookup = np.concatenate([[0], classes]).astype(np.uint8)
    # `cam_to_probabilities` without its normalisation, which keeps every pixel's order
    return lookup[np.concatenate([background, cams]).argmax(axis=0)]


def refine_seed(
    image: np.ndarray,
    cams: np.ndarray,
    cam_classes: Sequence[int] | np.ndarray,
    *,
    config: SeedConfig,
) -> np.ndarray:
    """H x W uint8 seed labels in {0} ∪ `cam_classes` (plus 255, ignore, under clip-es) of an
    H x W x 3 uint8 RGB `image` from its C x H x W CAMs in [0, 1] (C may be 0) of the C class
    ids `cam_classes` (full class space): CAMs + background plane, refined by a dense CRF.

    Raises:
        ValueError: shapes differ, non-finite or out-of-range CAMs, bad or repeated class ids,
            or an image that is not uint8 RGB.
    """
    cams = _check_cams(cams)
    classes = _check_classes(cam_classes, cams.shape[0], config.num_classes)
    _check_image(image, cams.shape[1:])
    if len(classes) == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    probs = cam_to_probabilities(
        cams, method=config.method, bg_threshold=config.bg_threshold, bg_power=config.bg_power
    )  # (1 + C) x H x W
    present = np.concatenate([[0], classes])  # local label -> class id
    if config.restrict_to_present:
        labels_of = present
    else:
        assert config.num_classes is not None  # SeedConfig guarantees it
        labels_of = np.arange(config.num_classes)
        full = np.zeros((config.num_classes,) + probs.shape[1:], np.float32)
        full[present] = probs
        probs = full
    num_labels = len(labels_of)

    if config.method == "weaktr":
        hard = probs.argmax(axis=0)
        unary = unary_from_labels(hard, num_labels, gt_prob=config.gt_prob, zero_unsure=False)
        q = crf_inference(image, unary, **config.crf_params())  # type: ignore[arg-type]
        return labels_of[q.argmax(axis=0)].astype(np.uint8)

    q = dense_crf(image, probs, prob_floor=config.prob_floor, **config.crf_params())  # type: ignore[arg-type]
    seed = labels_of[q.argmax(axis=0)].astype(np.uint8)
    seed[q.max(axis=0) < config.confidence_threshold] = IGNORE_INDEX
    return seed
