"""Small retrain inputs: an ingest output of synthetic images and a pseudo-mask output on it.

The pseudo-mask output is written here in the docs/CONTRACTS.md format (palette PNG masks, an index
shard, a `pseudo_masks` manifest whose `inputs[0]` is the ingest output), independently of the
pseudo-mask stage's code. Masks are the ground truth (`masks="gt"`, a sanity check that the
network learns) or the CAM argmax (`masks="cam"`, weaker labels).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from pipelines.ingest.rows import SHARD_SCHEMA
from pipelines.io import manifest as mf
from pipelines.io import schema
from pipelines.io.codecs import encode_label_png
from pipelines.io.storage import resolve, write_bytes_atomic
from pipelines.seeds import cam_argmax
from pipelines.synthetic.dataset import ingest_row
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample

CLASS_NAMES = SYNTHETIC_CLASSES.class_names
INDEX_SCHEMA = pa.schema(
    [
        (schema.IMAGE_ID, pa.string()),
        (schema.MASK, pa.string()),
        (schema.HEIGHT, pa.int32()),
        (schema.WIDTH, pa.int32()),
        (schema.LABELS, pa.list_(pa.int16())),
        (schema.CHECKPOINT_SHA256, pa.string()),
        (schema.SPLIT, pa.string()),
    ]
)


@dataclasses.dataclass(frozen=True)
class RetrainInputs:
    source: mf.Manifest  # the ingest output
    pseudo: mf.Manifest  # the pseudo-mask output
    train_ids: list[str]  # ids in the pseudo-mask index
    val_ids: list[str]  # val ids with GT that are not in the index


def make_inputs(
    root: str,
    *,
    train: int = 6,
    val: int = 3,
    indexed_val: int = 0,
    height: int = 96,
    width: int = 128,
    masks: str = "gt",
    seed: int = 7,
) -> RetrainInputs:
    """Writes `<root>/ingest` and `<root>/pseudo_masks` (committed) and returns them.

    Args:
        root: a directory URI or path.
        train: images of the train split (all in the index).
        val: images of the val split, with GT.
        indexed_val: how many of the val images also get a pseudo mask in the index (so they
            must not be scored).
        height, width: image size.
        masks: "gt" (masks = ground truth) or "cam" (CAM argmax at threshold 0.43).
        seed: dataset seed.
    """
    samples = [
        generate_sample(i, seed=seed, height=height, width=width) for i in range(train + val)
    ]
    splits = ["train"] * train + ["val"] * val
    base = resolve(root)
    source_loc = base.child("ingest")
    out = mf.StageOutput.open(source_loc, stage="ingest", config={"test": root}, inputs=[])
    rows = [ingest_row(s, split=split) for s, split in zip(samples, splits, strict=True)]
    entry = mf.write_parquet(
        source_loc, "shards/part-00000.parquet", pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    )
    source = out.commit(
        files=[entry],
        counts={"input": len(rows), "output": len(rows), "quarantined": 0},
        class_names=CLASS_NAMES,
        class_space="custom",
    )

    pseudo_loc = base.child("pseudo_masks")
    out = mf.StageOutput.open(
        pseudo_loc, stage="pseudo_masks", config={"masks": masks}, inputs=[source.input_ref()]
    )
    indexed = samples[: train + indexed_val]
    files, index = [], []
    for sample, split in zip(indexed, splits, strict=False):
        if masks == "gt":
            label = sample.gt
        else:
            classes = sorted(sample.cams)
            planes = np.stack([sample.cams[c] for c in classes])
            label = cam_argmax(planes, [c + 1 for c in classes], bg_threshold=0.43)
        png = encode_label_png(label)
        rel = f"masks/{sample.image_id}.png"
        write_bytes_atomic(pseudo_loc, rel, png)
        files.append(mf.FileEntry(path=rel, rows=None, bytes=len(png)))
        index.append(
            {
                schema.IMAGE_ID: sample.image_id,
                schema.MASK: rel,
                schema.HEIGHT: height,
                schema.WIDTH: width,
                schema.LABELS: list(sample.labels),
                schema.CHECKPOINT_SHA256: "0" * 64,
                schema.SPLIT: split,
            }
        )
    table = pa.Table.from_pylist(index, schema=INDEX_SCHEMA)
    files.append(mf.write_parquet(pseudo_loc, "shards/part-00000.parquet", table))
    pseudo = out.commit(
        files=files,
        counts={"input": len(indexed), "output": len(indexed), "quarantined": 0},
        class_names=CLASS_NAMES,
        class_space="custom",
    )
    ids = [s.image_id for s in samples]
    return RetrainInputs(
        source=source,
        pseudo=pseudo,
        train_ids=ids[: train + indexed_val],
        val_ids=ids[train + indexed_val :],
    )
