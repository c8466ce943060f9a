"""A synthetic WSSS dataset: textured shapes on clutter, GT masks and CAMs that act like real ones.

No dataset can be downloaded where this project is developed (docs/ARCHITECTURE.md), so tests
and the demo run on generated data, written in a real layout by `pipelines.synthetic.dataset`.

Images: a cluttered, low-saturation background with distractor blobs, and 1-3 (overlapping)
objects of six shape classes, each with its own saturated colour and texture; crisp edges.
GT: class ids with a 255 band about 5 px wide along every label border, as in VOC.
CAMs: one plane per labelled class on a 1/16 grid like a ViT's, peaked on a class-specific
part, covering the object partly and spilling onto context, blurred, upsampled bilinearly and
min-max normalised: argmax at a 0.4 background threshold lands near 50% mIoU.
Everything is a pure function of (seed, index): order and worker count do not change a byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.io.class_spaces import ClassSpace

CAM_STRIDE = 16  # CAMs are computed on a grid this much coarser than the image (ViT patch 16)
IGNORE = 255
_BAND_RADIUS = 2  # GT ignore band: pixels within 2 px of a label border (5 px wide)


@dataclass(frozen=True)
class ShapeClass:
    """How one foreground class looks and where its CAM peaks."""

    name: str  # class name (also the shape drawn)
    colour: tuple[int, int, int]  # mean RGB, saturated so that it stands out from background
    texture: str  # "stripes", "checks", "noise", "plain", "bars" or "dots"
    peak: tuple[float, float]  # discriminative part, object's unit frame (u right, v down)


SHAPE_CLASSES = (
    ShapeClass("disc", (215, 45, 40), "stripes", (0.4, -0.4)),
    ShapeClass("square", (40, 85, 215), "checks", (0.55, 0.55)),
    ShapeClass("triangle", (235, 200, 35), "noise", (0.0, -0.55)),
    ShapeClass("ring", (35, 175, 65), "plain", (0.0, -0.78)),
    ShapeClass("cross", (205, 45, 205), "bars", (0.0, -0.65)),
    ShapeClass("ellipse", (245, 135, 25), "dots", (0.65, 0.0)),
)
SYNTHETIC_CLASSES = ClassSpace("custom", ("background",) + tuple(s.name for s in SHAPE_CLASSES))

# Low-saturation background colours: far from every object colour, so colour separates them.
_BACKGROUND_COLOURS = np.array(
    [(122, 112, 100), (92, 102, 96), (140, 132, 118), (104, 98, 112), (80, 80, 76)], np.float32
)


@dataclass(frozen=True)
class Sample:
    """One generated image with its labels."""

    image_id: str  # unique within a dataset, e.g. "syn_000042"
    image: np.ndarray  # H x W x 3 uint8 RGB
    gt: np.ndarray  # H x W uint8 class ids, 255 along label borders
    labels: tuple[int, ...]  # ascending foreground class ids present in the image
    cams: dict[int, np.ndarray]  # {class id - 1: H x W float32 in [0, 1]}, one per label


@dataclass(frozen=True)
class _Placed:
    """One drawn object: class id, centre (x, y), radius and rotation in pixels, area drawn."""

    class_id: int
    centre: tuple[float, float]
    radius: float
    angle: float
    area: int


def sample_id(index: int) -> str:
    """The image id of sample `index`."""
    return f"syn_{index:06d}"


# Drawing helpers shared with `pipelines.synthetic.camouflage`.


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an h x w float plane (pixel-centre aligned, like align_corners=False)."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Zero-mean noise with features about `cell` pixels wide, roughly in [-1, 1]."""
    return resize_plane(rng.uniform(-1, 1, (height // cell + 2, width // cell + 2)), height, width)


def ignore_band(gt: np.ndarray, radius: int = _BAND_RADIUS) -> np.ndarray:
    """H x W bool: pixels within `radius` of a label change (VOC's void outline), marked on one
    side of each edge only, so the band is 2 * radius + 1 pixels wide."""
    edge = np.zeros(gt.shape, bool)
    edge[:, :-1] |= gt[:, 1:] != gt[:, :-1]
    edge[:-1] |= gt[1:] != gt[:-1]
    padded = np.pad(edge, radius)
    band = np.zeros_like(edge)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            band |= padded[dy : dy + gt.shape[0], dx : dx + gt.shape[1]]
    return band


def area_pool(mask: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """h x w share of each CAM_STRIDE cell covered by the H x W mask (h = ceil(H / 16))."""
    height, width = mask.shape
    grid = np.zeros(
        (-(-height // CAM_STRIDE) * CAM_STRIDE, -(-width // CAM_STRIDE) * CAM_STRIDE), dtype
    )
    grid[:height, :width] = mask
    return grid.reshape(grid.shape[0] // CAM_STRIDE, CAM_STRIDE, -1, CAM_STRIDE).mean(axis=(1, 3))


def rotated(u: Any, v: Any, angle: float) -> tuple[Any, Any]:
    """(u, v) in a frame turned by `angle` (arrays or floats)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return cos * u + sin * v, cos * v - sin * u


def _unit_frame(
    shape: tuple[int, int], centre: tuple[float, float], radius: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """H x W coordinates (u, v) of every pixel centre in an object's rotated frame, radius 1."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) + 0.5
    u, v = rotated(xs - centre[0], ys - centre[1], angle)
    return u / radius, v / radius


@dataclass(frozen=True)
class CamShape:
    """How a synthetic CAM covers its object (stds in object radii)."""

    peak_sigma: float  # std of the discriminative peak
    floor: float  # activation over the rest of the object (partial coverage)
    spill: float  # activation on context around the peak, outside the object
    context_sigma: float  # std of that spill
    others: float  # activation on other classes' objects (CAMs confuse co-occurring classes)
    clutter: tuple[float, float]  # peak range of false positives on background clutter


# Tuned so that argmax at a 0.4 background threshold scores ~0.5 mIoU (measured 0.51-0.53 over
# seeds 0-2 x 24 images and 96 images of seed 5) and the WeakTr CRF ~0.6.
_CAM = CamShape(
    peak_sigma=0.56, floor=0.26, spill=0.39, context_sigma=1.2, others=0.15, clutter=(0.15, 0.4)
)


def cam_response(
    shape: CamShape, own: np.ndarray, other: np.ndarray, peak: tuple[float, float], radius: float
) -> np.ndarray:
    """h x w activation of one object on the CAM grid from the share of each cell that it
    (`own`) and other objects (`other`) cover, peaked at `peak` (x, y), before `finish_cam`."""
    ys, xs = _cell_centres(own)
    dist2 = ((xs - peak[0]) ** 2 + (ys - peak[1]) ** 2) / radius**2
    core = np.exp(-dist2 / (2 * shape.peak_sigma**2))
    spill = np.exp(-dist2 / (2 * shape.context_sigma**2))
    on_object = own * (shape.floor + (1 - shape.floor) * core)
    return on_object + shape.spill * spill * (1 - own) + shape.others * other


def finish_cam(
    rng: np.random.Generator, low: np.ndarray, size: tuple[int, int], clutter: tuple[float, float]
) -> np.ndarray:
    """A CAM on its grid plus 0-2 false positives on background clutter (peaks in the range
    `clutter`) and noise, blurred ([1, 2, 1] / 4, separable), upsampled to H x W (`size`) and
    min-max normalised to [0, 1]: float32."""
    (height, width), (ys, xs) = size, _cell_centres(low)
    for _ in range(int(rng.integers(0, 3))):
        bx, by = rng.uniform(0, width), rng.uniform(0, height)
        spread = rng.uniform(0.05, 0.12) * min(height, width)
        low = low + rng.uniform(*clutter) * np.exp(
            -((xs - bx) ** 2 + (ys - by) ** 2) / (2 * spread**2)
        )
    low = np.maximum((low + rng.normal(0, 0.04, low.shape)).astype(low.dtype), 0)
    padded = np.pad(low, 1, mode="edge")
    rows = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    cam = resize_plane((rows[:-2] + 2 * rows[1:-1] + rows[2:]) / 4, height, width)
    low_value, high_value = float(cam.min()), float(cam.max())
    return ((cam - low_value) / max(high_value - low_value, 1e-6)).astype(np.float32)


def _cell_centres(grid: np.ndarray) -> np.ndarray:
    """2 x h x w (y, x) image coordinates of the centres of the cells of a CAM grid."""
    return (np.mgrid[0 : grid.shape[0], 0 : grid.shape[1]].astype(grid.dtype) + 0.5) * CAM_STRIDE


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    radius = np.hypot(u, v)
    if name == "disc":
        return radius <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":  # apex up at v = -1, base at v = 0.5
        return (v <= 0.5) & (v >= -1.0 + math.sqrt(3.0) * np.abs(u))
    if name == "ring":
        return (radius <= 1.0) & (radius >= 0.55)
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if name == "ellipse":
        return u**2 + (v / 0.55) ** 2 <= 1.0
    raise ValueError(f"unknown shape {name!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness factor around 1 that gives each class its surface pattern."""
    if kind == "stripes":
        return np.where(np.sin((u + v) * 9.0) > 0, 1.08, 0.82)
    if kind == "checks":
        return np.where((np.floor(u * 3.5) + np.floor(v * 3.5)) % 2 == 0, 1.08, 0.8)
    if kind == "noise":
        return 0.92 + 0.1 * rng.standard_normal(u.shape)
    if kind == "bars":
        return np.where(np.sin(v * 14.0) > 0.3, 0.8, 1.05)
    if kind == "dots":
        return np.where(np.hypot((u * 4) % 1 - 0.5, (v * 4) % 1 - 0.5) < 0.25, 0.75, 1.05)
    return np.ones_like(u)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cluttered low-saturation texture with distractor blobs: H x W x 3 float32."""
    base = _BACKGROUND_COLOURS[rng.integers(len(_BACKGROUND_COLOURS))]
    image = np.empty((height, width, 3), np.float32)
    shade = 28 * smooth_noise(rng, height, width, 48)  # shared: keeps the clutter grey-ish
    for channel in range(3):
        tint = 10 * smooth_noise(rng, height, width, 64)
        grain = 10 * smooth_noise(rng, height, width, 6)
        image[..., channel] = base[channel] + shade + tint + grain
    for _ in range(int(rng.integers(3, 7))):  # distractors: blobs in other background colours
        colour = _BACKGROUND_COLOURS[rng.integers(len(_BACKGROUND_COLOURS))] * rng.uniform(0.8, 1.2)
        radius = rng.uniform(0.05, 0.14) * min(height, width)
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        u, v = _unit_frame((height, width), centre, radius, rng.uniform(0, math.pi))
        blob = u**2 + (v / rng.uniform(0.4, 1.0)) ** 2 <= 1.0
        image[blob] = 0.5 * image[blob] + 0.5 * colour
    return image


def _cam(rng: np.random.Generator, placed: _Placed, gt: np.ndarray) -> np.ndarray:
    """A CAM plane for one object of the H x W label map `gt`: peaked on its discriminative
    part, partial, spilling over (and firing a little on the other objects)."""
    visible = gt == placed.class_id
    shape = SHAPE_CLASSES[placed.class_id - 1]
    pu = shape.peak[0] + rng.normal(0, 0.15)
    du, dv = rotated(pu, shape.peak[1] + rng.normal(0, 0.15), -placed.angle)
    peak_x, peak_y = placed.centre[0] + placed.radius * du, placed.centre[1] + placed.radius * dv
    own, other = area_pool(visible, np.float32), area_pool((gt != 0) & ~visible, np.float32)
    cam = cam_response(_CAM, own, other, (peak_x, peak_y), placed.radius)
    return finish_cam(rng, cam, gt.shape, _CAM.clutter)


def _check_space(class_space: ClassSpace) -> None:
    names, known = class_space.class_names[1:], SYNTHETIC_CLASSES.class_names[1:]
    if names != known[: len(names)]:
        raise ValueError(
            f"class_space: synthetic classes are background + a prefix of {list(known)}"
        )


def generate_sample(
    index: int,
    *,
    seed: int,
    height: int = 320,
    width: int = 448,
    class_space: ClassSpace = SYNTHETIC_CLASSES,
) -> Sample:
    """Sample `index` (image id `sample_id(index)`) of the dataset `seed` (both >= 0) at H x W
    (>= 32) in `class_space` (SYNTHETIC_CLASSES or a prefix of its classes); a pure function of
    its arguments. `cams` has one plane per label, keyed by foreground index (class id - 1)."""
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be >= 0")
    if height < 32 or width < 32:
        raise ValueError("height and width must be >= 32")
    _check_space(class_space)
    rng = np.random.default_rng([seed, index])
    image = _background(rng, height, width)
    gt = np.zeros((height, width), np.uint8)
    num_fg = class_space.num_classes - 1
    count = int(rng.integers(1, min(3, num_fg) + 1))
    class_ids = sorted(int(c) + 1 for c in rng.choice(num_fg, size=count, replace=False))
    placed: list[_Placed] = []
    for class_id in rng.permutation(class_ids):  # paint order = occlusion order
        shape = SHAPE_CLASSES[int(class_id) - 1]
        for _attempt in range(20):  # a new object may hide at most half of an earlier one
            radius = float(rng.uniform(0.14, 0.3) * min(height, width))
            centre = (
                float(rng.uniform(0.6 * radius, width - 0.6 * radius)),
                float(rng.uniform(0.6 * radius, height - 0.6 * radius)),
            )
            angle = float(rng.uniform(0, 2 * math.pi))
            u, v = _unit_frame((height, width), centre, radius, angle)
            mask = _shape_mask(shape.name, u, v)
            if all(np.count_nonzero(mask & (gt == p.class_id)) <= 0.5 * p.area for p in placed):
                break
        colour = np.asarray(shape.colour, np.float32) + rng.uniform(-15, 15, 3)
        texture = _texture(shape.texture, u, v, rng)
        image[mask] = colour * texture[mask][:, None]
        gt[mask] = class_id
        placed.append(_Placed(int(class_id), centre, radius, angle, int(np.count_nonzero(mask))))
    image += rng.normal(0, 5, image.shape)
    cams = {obj.class_id - 1: _cam(rng, obj, gt) for obj in placed}
    gt[ignore_band(gt)] = IGNORE
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Sample(sample_id(index), pixels, gt, tuple(class_ids), dict(sorted(cams.items())))
