"""Options of the ingest stage: the input layout, the class space, limits and file names."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.ingest.rows import LAYOUTS
from pipelines.io.codecs import MAX_PIXELS
from weakclip.config import check_fields

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_ROWS_PER_UNIT = 16


@dataclass(frozen=True)
class IngestConfig:
    """Options of the ingest stage (CLI flags and `--config` fields)."""

    layout: str = "mctformer"  # CAM file layout: "mctformer" (dict per class) or "clip-es"
    classes: str | None = None  # voc | coco91 | coco81 | URI of a classes.txt; None: input's
    splits: tuple[str, ...] = ()  # "NAME=URI" or "URI" (name = file stem); relative to --input
    max_error_fraction: float = 0.01  # above this share of quarantined rows the job fails
    max_pixels: int = MAX_PIXELS  # larger images are quarantined before decoding
    rows_per_shard: int = 256  # rows per output shard (≈ a few hundred MB at VOC size)
    # rows per Parquet row group of the shards = the unit of work of refine, pseudo_masks and
    # evaluate (the last row group of a shard may be shorter)
    rows_per_unit: int = DEFAULT_ROWS_PER_UNIT
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
        if not 1 <= self.rows_per_shard <= 100_000:
            raise ValueError("rows_per_shard: must be in [1, 100000]")
        # the default also goes with smaller shards (which then are one row group)
        if not 1 <= self.rows_per_unit <= max(self.rows_per_shard, DEFAULT_ROWS_PER_UNIT):
            raise ValueError("rows_per_unit: must be in [1, rows_per_shard]")
        if self.image_suffix not in IMAGE_SUFFIXES:
            raise ValueError(f"image_suffix: expected one of {IMAGE_SUFFIXES}")
        for name in ("image_dir", "cam_dir", "gt_dir", "labels_file"):
            value = getattr(self, name)
            if not value or value.startswith("/") or ".." in value.split("/"):
                raise ValueError(f"{name}: must be a relative path inside the input")
