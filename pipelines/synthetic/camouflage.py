"""A second synthetic WSSS family ("camouflage"): objects that only shape and texture give away,
so that quality claims are also checked on data the recipe was not tuned on.

- Classes: VOC (21 ids) or COCO's 91-id space; a fixed subset per dataset, chosen by the seed
  (VOC 6, COCO 8, person, dog and bird always among them); unused COCO ids never occur.
- Images: VOC-like sizes drawn per image. All classes and the background share one palette; a
  class is its silhouette (star, crescent, hexagon, ...) and a bold surface pattern (+-80%
  brightness). The background is a mosaic of the same colours with a fine non-periodic grain;
  half of the objects take the colour of the patch under them, each shifted by a slight
  brightness step (edges for a CRF).
- GT and CAMs as in `pipelines.synthetic.shapes`.

With `class_colours=True` the same scenes (the same random draws, so the same ground truth and
CAMs) become the colour-separable "colours" family: each class in its own saturated colour,
which neither the background nor any other class uses, with a faint pattern (+-10%) on objects
and background patches patterned at other scales than the objects'.

Calibration (docs/METHOD.md): with faint class patterns, and background patches carrying the
class patterns, not even an independent control (`benchmarks.feature_control`) learnt any
foreground from the ground truth; with bold patterns on grain it learns the family from its
seeds, given a longer schedule than the colour families need.
Everything is a pure function of (seed, index, class space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.io.class_spaces import VOC, ClassSpace
from pipelines.synthetic.shapes import (
    IGNORE,
    CamShape,
    Sample,
    area_pool,
    cam_response,
    finish_cam,
    ignore_band,
    rotated,
    smooth_noise,
)

SUBSET_SIZES = {"voc": 6, "coco91": 8}  # present classes per dataset
MAX_OBJECTS = {"voc": 3, "coco91": 4}  # objects per image: 1..this
ANCHOR_CLASSES = ("person", "dog", "bird")  # always in the subset: the classes people look at
_STREAM = 0xCA3F  # keeps this family's random streams apart from the "shapes" family's
_CAMOUFLAGE_SHARE = 0.5  # objects that take the colour of the background patch under them
_OBJECT_TEXTURE = 0.8  # pattern contrast on camouflage objects (background: grain, +-5-12%)
_COLOURS_TEXTURE = 0.1  # on the colours family's objects (background patches patterned +-5-12%)
# Tuned on the CAMs alone: argmax at a 0.43 background threshold (refine's default) measured
# 0.52-0.63 mIoU (voc) / 0.52-0.56 (coco91) and WeakTr CRF seeds +8-11 / +6-7 points (40
# images each of seeds 0-3).
_CAM = CamShape(
    peak_sigma=0.5, floor=0.46, spill=0.55, context_sigma=0.8, others=0.15, clutter=(0.35, 0.65)
)

# Shared palette: every class and the background draw from it (muted natural tones).
PALETTE = np.array(
    [(118, 128, 72), (150, 96, 64), (92, 108, 138), (176, 160, 120), (84, 132, 120),
     (128, 92, 120)],
    np.float32,
)  # fmt: skip

# One saturated colour per present class in the "colours" variant (ascending class id order).
CLASS_COLOURS = np.array(
    [(220, 40, 40), (40, 200, 60), (40, 80, 230), (230, 210, 30), (200, 40, 210),
     (30, 210, 220), (240, 130, 20), (245, 245, 245)],
    np.float32,
)  # fmt: skip


@dataclass(frozen=True)
class Look:
    """What makes a class recognisable: silhouette, surface pattern, discriminative part."""

    silhouette: str  # a name known to `_silhouette`
    texture: str  # a pattern name known to `_pattern`
    frequency: float  # pattern cycles per object radius
    orientation: float  # pattern angle in the object frame, radians
    peak: tuple[float, float]  # (u, v) of the discriminative part (object frame, v down)


LOOKS = (
    Look("star", "stripes", 5.0, 0.0, (0.0, -0.75)),
    Look("crescent", "rings", 7.0, 0.0, (0.1, -0.82)),
    Look("hexagon", "checks", 3.0, 0.4, (0.5, 0.3)),
    Look("ell", "stripes", 11.0, 1.05, (-0.6, 0.6)),
    Look("holed_blob", "dots", 4.5, 0.0, (0.0, 0.0)),
    Look("arrow", "waves", 6.0, 1.57, (0.5, 0.0)),
    Look("tee", "hatch", 6.5, 0.78, (0.6, -0.7)),
    Look("house", "speckle", 9.0, 0.0, (0.0, -0.45)),
)
_TEXTURES = tuple(sorted({look.texture for look in LOOKS}))


def camo_sample_id(index: int) -> str:
    """The image id of sample `index` of this family."""
    return f"camo_{index:06d}"


def camo_classes(seed: int, class_space: ClassSpace) -> dict[int, Look]:
    """{class id: look} of the dataset's present classes, ascending: the anchor classes plus
    others drawn by the seed (>= 0). ValueError for a class space other than VOC or COCO91."""
    name = class_space.name
    if name not in SUBSET_SIZES:
        raise ValueError(f"class_space: expected voc or coco91, got {name!r}")
    rng = np.random.default_rng([seed, _STREAM, 0])
    anchors = [class_space.class_names.index(n) for n in ANCHOR_CLASSES]
    others = [i for i in class_space.foreground_ids if i not in anchors]
    extra = rng.choice(others, size=SUBSET_SIZES[name] - len(anchors), replace=False)
    ids = sorted(anchors + [int(i) for i in extra])
    looks = rng.permutation(len(LOOKS))[: len(ids)]
    return {class_id: LOOKS[int(k)] for class_id, k in zip(ids, looks, strict=True)}


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(H, W): long side 281-500 (500 half of the time, as in VOC), short side 250-375."""
    long_side = 500 if rng.random() < 0.5 else int(rng.integers(281, 500))
    short_side = int(rng.integers(250, min(long_side, 375) + 1))
    return (long_side, short_side) if rng.random() < 0.35 else (short_side, long_side)


def _frame(
    shape: tuple[int, int], centre: tuple[float, float], radius: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """H x W object-frame coordinates (u, v) of every pixel centre; radius 1, rotated."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) + 0.5
    return rotated((xs - centre[0]) / radius, (ys - centre[1]) / radius, angle)


def _silhouette(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """H x W bool: inside the class's silhouette (about the unit disc)."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if name == "star":  # five tips, one pointing up (v = -1)
        phase = np.abs(((theta + math.pi / 2) / (2 * math.pi / 5)) % 1.0 - 0.5) * 2
        return r <= 0.42 + 0.58 * (1 - phase) ** 1.5
    if name == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.78)
    if name == "hexagon":
        return (np.abs(v) <= 0.87) & (0.87 * np.abs(u) + 0.5 * np.abs(v) <= 0.87)
    if name == "ell":
        box = (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
        return box & ((u <= -0.3) | (v >= 0.3))
    if name == "holed_blob":
        blob = r <= 0.95 + 0.1 * np.sin(3 * theta)
        for k in range(3):
            hx, hy = 0.5 * math.cos(2 * math.pi * k / 3), 0.5 * math.sin(2 * math.pi * k / 3)
            blob &= np.hypot(u - hx, v - hy) > 0.2
        return blob
    if name == "arrow":
        shaft = (u >= -1.0) & (u <= 0.2) & (np.abs(v) <= 0.25)
        return shaft | ((u >= 0.2) & (u <= 1.0) & (np.abs(v) <= 0.85 * (1.0 - u)))
    if name == "tee":
        return ((np.abs(u) <= 0.9) & (v >= -0.9) & (v <= -0.45)) | (
            (np.abs(u) <= 0.22) & (v >= -0.45) & (v <= 0.9)
        )
    if name == "house":
        walls = (np.abs(u) <= 0.7) & (v >= -0.1) & (v <= 0.85)
        return walls | ((v >= -0.95) & (v < -0.1) & (np.abs(u) <= 0.85 * (v + 0.95) / 0.85))
    raise ValueError(f"unknown silhouette {name!r}")


def _pattern(
    kind: str, u: np.ndarray, v: np.ndarray, frequency: float, rng: np.random.Generator
) -> np.ndarray:
    """H x W pattern in [-1, 1]; `frequency` in cycles per unit of (u, v)."""
    w = 2 * math.pi * frequency
    if kind == "stripes":
        return np.sign(np.sin(w * u))
    if kind == "rings":
        return np.sin(w * np.hypot(u, v))
    if kind == "checks":
        return np.sign(np.sin(w * u) * np.sin(w * v))
    if kind == "dots":
        return np.where(
            np.hypot((frequency * u) % 1 - 0.5, (frequency * v) % 1 - 0.5) < 0.28, -1, 1
        )
    if kind == "waves":
        return np.sin(w * u + 2.5 * np.sin(w * v / 3))
    if kind == "hatch":
        return np.maximum(np.sign(np.sin(w * u)), np.sign(np.sin(w * v)))
    if kind == "speckle":  # random cells about 1 / frequency wide
        cells = rng.uniform(-1, 1, (64, 64))
        iu = np.floor(frequency * u).astype(np.int64) % 64
        return cells[iu, np.floor(frequency * v).astype(np.int64) % 64]
    raise ValueError(f"unknown texture {kind!r}")


def _background(
    rng: np.random.Generator, height: int, width: int, grain: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A warped mosaic of palette colours: the H x W x 3 image and the H x W x 3 plain colour of
    the patch under each pixel. Each patch's surface is the H x W `grain` when given, else its
    own pattern (the same draws from `rng` either way)."""
    count = int(rng.integers(6, 12))
    sites = rng.uniform((0, 0), (width, height), (count, 2))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    warp = 40 * smooth_noise(rng, height, width, 80), 40 * smooth_noise(rng, height, width, 80)
    dist = [(xs + warp[0] - sx) ** 2 + (ys + warp[1] - sy) ** 2 for sx, sy in sites]
    region = np.argmin(np.stack(dist), axis=0)
    image = np.empty((height, width, 3), np.float32)
    plain = np.empty((height, width, 3), np.float32)
    scale = min(height, width) / 4  # object radii are about this big: patterns at other scales
    for k in range(count):
        inside = region == k
        colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.85, 1.15)
        u, v = rotated(xs[inside] / scale, ys[inside] / scale, rng.uniform(0, math.pi))
        frequency = rng.uniform(2.0, 14.0) * rng.choice([0.4, 2.2])
        texture = _pattern(_TEXTURES[rng.integers(len(_TEXTURES))], u, v, frequency, rng)
        surface = texture if grain is None else grain[inside]
        image[inside] = colour * (1 + rng.uniform(0.05, 0.12) * surface)[:, None]
        plain[inside] = colour
    shade = 1 + 0.08 * smooth_noise(rng, height, width, 120)  # lighting: spans patches and objects
    return image * shade[..., None], plain


@dataclass(frozen=True)
class _Object:
    """One drawn instance: class, look, centre (x, y) and radius in pixels, rotation."""

    class_id: int
    look: Look
    centre: tuple[float, float]
    radius: float
    angle: float


def _low_res_cam(
    rng: np.random.Generator, obj: _Object, visible: np.ndarray, others: np.ndarray
) -> np.ndarray:
    """h x w activation of one instance on the CAM grid, before `finish_cam`."""
    pu, pv = (p + float(rng.normal(0, 0.12)) for p in obj.look.peak)
    du, dv = rotated(pu, pv, -obj.angle)  # object frame back to image axes
    peak = (obj.centre[0] + obj.radius * du, obj.centre[1] + obj.radius * dv)
    return cam_response(_CAM, area_pool(visible), area_pool(others), peak, obj.radius)


def generate_camo_sample(
    index: int, *, seed: int, class_space: ClassSpace = VOC, class_colours: bool = False
) -> Sample:
    """Sample `index` of the camouflage dataset `seed` (both >= 0; the seed also fixes the
    present classes, `camo_classes`) in `class_space` (VOC or COCO91), at its drawn size H x W;
    a pure function of its arguments. `class_colours`: each object in its class's colour
    (`CLASS_COLOURS`), the "colours" family. `cams` is keyed by class id - 1 (the index into the
    space's conventional `cls_labels` vector, VOC 20-d, COCO 90-d)."""
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be >= 0")
    looks = camo_classes(seed, class_space)
    rng = np.random.default_rng([seed, _STREAM, 1, index])
    height, width = _image_size(rng)
    grain = None
    if not class_colours:  # its own stream: the colours family draws the same scenes
        grain_rng = np.random.default_rng([seed, _STREAM, 2, index])
        fine = smooth_noise(grain_rng, height, width, 6)
        grain = fine + 0.5 * smooth_noise(grain_rng, height, width, 20)
    image, plain = _background(rng, height, width, grain)
    instances = np.zeros((height, width), np.uint8)  # instance number, 0 = background
    objects: list[_Object] = []
    ids = list(looks)
    class_colour = dict(zip(ids, CLASS_COLOURS, strict=False))  # ids ascend (camo_classes)
    for _ in range(int(rng.integers(1, MAX_OBJECTS[class_space.name] + 1))):
        class_id = int(ids[rng.integers(len(ids))])
        look = looks[class_id]
        visible = np.bincount(instances.ravel(), minlength=len(objects) + 1)[1:]
        for _attempt in range(20):  # a new object hides at most half of what shows of another
            radius = float(rng.uniform(0.16, 0.34) * min(height, width))
            centre = (
                float(rng.uniform(0.7 * radius, width - 0.7 * radius)),
                float(rng.uniform(0.7 * radius, height - 0.7 * radius)),
            )
            angle = float(rng.uniform(-0.6, 0.6))  # mostly upright, as objects in photos
            u, v = _frame((height, width), centre, radius, angle)
            mask = _silhouette(look.silhouette, u, v)
            hidden = np.bincount(instances[mask], minlength=len(objects) + 1)[1:]
            if np.all(hidden <= 0.5 * visible):
                break
        if rng.random() < _CAMOUFLAGE_SHARE:  # the colour of the patch it sits on
            colour = plain[int(centre[1]), int(centre[0])]
        else:
            colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.85, 1.15)
        if class_colours:  # the same draws as above, so the scenes stay the same
            colour = class_colour[class_id]
        beneath = float(image[mask].mean())
        # slight contrast: brightness shifted away from what lies beneath, so edges exist
        offset = rng.uniform(10, 22) * (1 if colour.mean() >= beneath else -1)
        texture = _pattern(look.texture, *rotated(u, v, look.orientation), look.frequency, rng)
        contrast = _COLOURS_TEXTURE if class_colours else _OBJECT_TEXTURE
        image[mask] = (colour + offset) * (1 + contrast * texture[mask])[:, None]
        instances[mask] = len(objects) + 1
        objects.append(_Object(class_id, look, centre, radius, angle))
    image += rng.normal(0, 3.0, image.shape)
    gt = np.array([0] + [o.class_id for o in objects], np.uint8)[instances]
    lows: dict[int, np.ndarray] = {}
    for number, obj in enumerate(objects, start=1):
        visible_mask = instances == number
        if not visible_mask.any():  # wholly hidden: not in the labels, no CAM
            continue
        low = _low_res_cam(rng, obj, visible_mask, (gt != 0) & (gt != obj.class_id))
        lows[obj.class_id] = np.maximum(lows[obj.class_id], low) if obj.class_id in lows else low
    cams = {c - 1: finish_cam(rng, lows[c], (height, width), _CAM.clutter) for c in sorted(lows)}
    gt[ignore_band(gt)] = IGNORE
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Sample(camo_sample_id(index), pixels, gt, tuple(c + 1 for c in cams), cams)
