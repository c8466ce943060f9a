"""Class spaces: VOC (21), COCO-2014 in category-id space (91) or contiguous (81), or custom.

Label maps hold class ids of one space (index = class id, 0 = background, 255 = ignore;
docs/CONTRACTS.md "Label maps"). coco91 keeps COCO's category ids 1..90, ten of which never
occur; coco81 renumbers the 80 used categories contiguously. Conversions go through explicit
tables and fail loudly on ids without a counterpart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = 255  # label maps: pixels that carry no label

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# COCO 2014/2017 category id -> name for the 80 categories that have annotations.
_COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl",
    52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch",
    64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}  # fmt: skip

# Category ids reserved by COCO but never annotated (street sign, hat, shoe, eye glasses, plate,
# mirror, window, desk, door, blender).
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)

COCO91_CLASSES = ("background",) + tuple(
    _COCO_CATEGORIES.get(i, f"unused_{i}") for i in range(1, 91)
)
COCO81_CLASSES = ("background",) + tuple(_COCO_CATEGORIES[i] for i in sorted(_COCO_CATEGORIES))


# COCO81_TO_COCO91[id81] = id91; COCO91_TO_COCO81[id91] = id81 (IGNORE for the unused ids).
COCO81_TO_COCO91 = np.array([0, *sorted(_COCO_CATEGORIES)], np.uint8)
COCO91_TO_COCO81 = np.full(91, IGNORE, np.uint8)
COCO91_TO_COCO81[COCO81_TO_COCO91] = np.arange(81)
COCO81_TO_COCO91.setflags(write=False)
COCO91_TO_COCO81.setflags(write=False)

_MAX_NAME_LENGTH = 64


@dataclass(frozen=True)
class ClassSpace:
    """Names of the classes of one dataset; the index of a name is its class id."""

    name: str  # "voc", "coco91", "coco81" or "custom"
    # index = class id, 0 = "background"; coco91's `unused_<n>` ids only keep COCO's numbering
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.name not in ("voc", "coco91", "coco81", "custom"):
            raise ValueError(f"name: unknown class space {self.name!r}")
        if len(self.class_names) < 2 or self.class_names[0] != "background":
            raise ValueError("class_names: need 'background' first and at least one more class")
        if len(self.class_names) > IGNORE:
            raise ValueError(f"class_names: at most {IGNORE} classes fit a uint8 label map")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names: duplicate names")

    @property
    def num_classes(self) -> int:
        """Number of class ids, background included (21 VOC, 91 / 81 COCO)."""
        return len(self.class_names)

    @property
    def unused_ids(self) -> frozenset[int]:
        """Ids that exist in the numbering but never occur (coco91 only)."""
        return frozenset(COCO_UNUSED_IDS) if self.name == "coco91" else frozenset()

    @property
    def foreground_ids(self) -> tuple[int, ...]:
        """Every id an image label may hold: 1..K-1 minus the unused ones."""
        unused = self.unused_ids
        return tuple(i for i in range(1, self.num_classes) if i not in unused)

    @property
    def multihot_lengths(self) -> tuple[int, ...]:
        """Accepted lengths of a `cls_labels` multi-hot vector for this space."""
        # coco81: COCO's category-id space (mapped), or already contiguous
        return (90, 80) if self.name == "coco81" else (self.num_classes - 1,)


VOC = ClassSpace("voc", VOC_CLASSES)
COCO91 = ClassSpace("coco91", COCO91_CLASSES)
COCO81 = ClassSpace("coco81", COCO81_CLASSES)
_BUILTIN = {"voc": VOC, "coco91": COCO91, "coco81": COCO81}


def class_space_from_arg(arg: str | Sequence[str]) -> ClassSpace:
    """Resolves `--classes`: "voc", "coco91", "coco81", or a custom space from classes.txt
    content (one name per line, background first; blank lines and surrounding whitespace
    ignored) or a name list; names must be unique printable text.

    Raises:
        ValueError: an unknown single word, or a malformed class list.
    """
    if isinstance(arg, str):
        key = arg.strip().lower()
        if key in _BUILTIN:
            return _BUILTIN[key]
        if "\n" not in arg.strip():
            raise ValueError(
                f"unknown class space {arg.strip()[:64]!r}: expected voc, coco91, coco81 or "
                "the text of a classes.txt (one name per line, background first)"
            )
    lines = arg.splitlines() if isinstance(arg, str) else list(arg)
    names = tuple(line.strip() for line in lines if line.strip())
    for name in names:
        if len(name) > _MAX_NAME_LENGTH or not name.isprintable():
            raise ValueError(f"class name {name[:_MAX_NAME_LENGTH]!r} is not a printable name")
    return ClassSpace("custom", names)


def labels_from_multihot(vector: np.ndarray | Sequence[float], space: ClassSpace) -> list[int]:
    """Class ids (ascending) of a `cls_labels` multi-hot vector (set: value > 0.5).

    VOC and custom: index i -> id i + 1. COCO: 90 entries in category-id space without
    background (i -> category id i + 1), mapped to coco81 ids there; coco81 also takes 80.

    Raises:
        ValueError: wrong length for the space, non-finite values, or a set entry at an id that
            never occurs (an unused COCO category id).
    """
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] not in space.multihot_lengths:
        raise ValueError(
            f"label vector of shape {values.shape} for {space.name}: expected length "
            f"{' or '.join(str(n) for n in space.multihot_lengths)}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("label vector holds non-finite values")
    ids = [int(i) + 1 for i in np.flatnonzero(values > 0.5)]
    if space.name in ("coco91", "coco81") and values.shape[0] == 90:
        unused = sorted(set(ids) & set(COCO_UNUSED_IDS))
        if unused:
            raise ValueError(f"label vector sets unused COCO category ids {unused}")
        if space.name == "coco81":
            ids = [int(COCO91_TO_COCO81[i]) for i in ids]
    return ids


def coco91_to_coco81(ids: np.ndarray) -> np.ndarray:
    """Maps coco91 ids (a label map or id list) to coco81; IGNORE stays IGNORE.

    Raises:
        ValueError: an id outside 0..90 (other than IGNORE) or an unused category id.
    """
    ids = np.asarray(ids)
    out = _map_ids(ids, COCO91_TO_COCO81, "coco91")
    bad = (ids != IGNORE) & (out == IGNORE)  # only the unused ids map to IGNORE
    if np.any(bad):
        raise ValueError(f"unused COCO category ids {sorted(set(ids[bad].tolist()))}")
    return out


def coco81_to_coco91(ids: np.ndarray) -> np.ndarray:
    """Maps coco81 ids (a label map or id list) to coco91 category ids; IGNORE stays IGNORE.

    Raises:
        ValueError: an id outside 0..80 other than IGNORE.
    """
    return _map_ids(np.asarray(ids), COCO81_TO_COCO91, "coco81")


def _map_ids(ids: np.ndarray, table: np.ndarray, space: str) -> np.ndarray:
    valid = ids != IGNORE
    if np.any(valid & ((ids < 0) | (ids >= len(table)))):
        raise ValueError(f"ids outside the {space} space (0..{len(table) - 1}, 255)")
    out = np.full(ids.shape, IGNORE, np.uint8)
    out[valid] = table[ids[valid].astype(np.intp)]
    return out
