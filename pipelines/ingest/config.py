"""Options of the ingest stage: the input layout, the class space, limits and file names."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.ingest.rows import LAYOUTS
from pipelines.io.codecs import MAX_PIXELS
from pipelines.units import ROWS_PER_GROUP
from weakclip.config import check_fields

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_ROWS_PER_UNIT = 1_000_000


@dataclass(frozen=True)
class IngestConfig:
    """Options of the ingest stage (CLI flags and `--config` fields)."""

    layout: str = "mctformer"  # CAM file layout: "mctformer" (dict per class) or "clip-es"
    classes: str | None = None  # voc | coco91 | coco81 | URI of a classes.txt; None: input's
    splits: tuple[str, ...] = ()  # "NAME=URI" or "URI" (name = file stem); relative to --input
    max_error_fraction: float = 0.01  # above this share of quarantined rows the job fails
    max_pixels: int = MAX_PIXELS  # larger images are quarantined before decoding
    # rows per unit = per shard and completion record; None: sized for ~96 MiB shards from
    # the first rows of the input (`pipelines.units.rows_per_unit_for`)
    rows_per_unit: int | None = None
    rows_per_shard: int | None = None  # the old name of rows_per_unit (either may be given)
    # rows per Parquet row group of the shards: what later stages read at once (the last row
    # group of a shard may be shorter)
    rows_per_group: int = ROWS_PER_GROUP
    image_dir: str = "JPEGImages"  # folders and files of the input layout
    cam_dir: str = "cams"
    gt_dir: str = "SegmentationClassAug"
    labels_file: str = "cls_labels.npy"
    image_suffix: str = ".jpg"  # used with split lists, where nothing is listed

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        check_fields(self, "in [0, 1]", "max_error_fraction")
        check_fields(self, "> 0", "max_pixels")
        given = {v for v in (self.rows_per_unit, self.rows_per_shard) if v is not None}
        if len(given) > 1:
            raise ValueError("rows_per_shard is the old name of rows_per_unit: give one value")
        if given and not 1 <= given.pop() <= MAX_ROWS_PER_UNIT:
            raise ValueError(f"rows_per_unit: must be in [1, {MAX_ROWS_PER_UNIT}]")
        check_fields(self, ">= 1", "rows_per_group")
        if self.image_suffix not in IMAGE_SUFFIXES:
            raise ValueError(f"image_suffix: expected one of {IMAGE_SUFFIXES}")
        for name in ("image_dir", "cam_dir", "gt_dir", "labels_file"):
            value = getattr(self, name)
            if not value or value.startswith("/") or ".." in value.split("/"):
                raise ValueError(f"{name}: must be a relative path inside the input")

    @property
    def unit_rows(self) -> int | None:
        """The rows per unit given under either name; None: sized from the input."""
        return self.rows_per_unit if self.rows_per_unit is not None else self.rows_per_shard
