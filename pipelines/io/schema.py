"""Column names of every Parquet shard the stages write (docs/CONTRACTS.md, "What each stage
writes"), so a typo is an ImportError rather than a silently empty column; and the format tag
of train's `model.pt`, which the pseudo-mask stage checks without importing the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ingest shards
IMAGE_ID = "image_id"  # string, unique per dataset
IMAGE = "image"  # encoded image bytes exactly as given (JPEG/PNG)
HEIGHT = "height"  # int32
WIDTH = "width"  # int32
LABELS = "labels"  # list<int16>: class ids in the full class space (0 = background, never listed)
CAM = "cam"  # bytes of a float16 C-order array [len(cam_classes), height, width]
CAM_CLASSES = "cam_classes"  # list<int16>: class id of each CAM plane
GT = "gt"  # PNG bytes of the ground-truth class-id map, or null
SOURCE = "source"  # string: where the row came from (relative input path)
SPLIT = "split"  # string: "train" / "val" / ... when a split list is given, else null

# refine shards (plus IMAGE_ID, IMAGE, HEIGHT, WIDTH, LABELS, GT, SPLIT)
SEED = "seed"  # PNG bytes of the uint8 seed-label map, 255 = ignore

# pseudo-mask index
MASK = "mask"  # relative path of the mask PNG inside the stage output
CHECKPOINT_SHA256 = "checkpoint_sha256"

# quarantine tables
REASON = "reason"  # one line: why the row was rejected

INGEST_COLUMNS = (IMAGE_ID, IMAGE, HEIGHT, WIDTH, LABELS, CAM, CAM_CLASSES, GT, SOURCE, SPLIT)
REFINE_COLUMNS = (IMAGE_ID, IMAGE, HEIGHT, WIDTH, LABELS, SEED, GT, SPLIT)
QUARANTINE_COLUMNS = (IMAGE_ID, SOURCE, REASON)
PSEUDO_MASK_COLUMNS = (IMAGE_ID, MASK, HEIGHT, WIDTH, LABELS, CHECKPOINT_SHA256, SPLIT)


def arrow_schema(columns: Sequence[str]) -> Any:
    """The `pyarrow.Schema` of a shard holding `columns`, in that order (the types above)."""
    import pyarrow as pa

    labels, binary = pa.list_(pa.int16()), pa.binary()
    types = {IMAGE: binary, HEIGHT: pa.int32(), WIDTH: pa.int32(), LABELS: labels, GT: binary}
    types |= {CAM: pa.large_binary(), CAM_CLASSES: labels, SEED: binary}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


# train's model.pt (pipelines.train.export)
EXPORT_FORMAT = "weakclip-export-v1"

IGNORE_INDEX = 255  # label maps: pixels that carry no label
