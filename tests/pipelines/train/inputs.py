"""A small refine-format input for the training tests (synthetic images + CRF seeds)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.io import manifest as mf
from pipelines.io import schema
from pipelines.io.storage import resolve
from pipelines.refine.rows import REFINE_SCHEMA
from pipelines.seeds import SeedConfig, refine_seed
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def refine_rows(count: int, *, val: int = 0, height: int = 96, width: int = 128) -> list[dict]:
    """`count` synthetic rows with WeakTr CRF seeds; the last `val` are in the val split."""
    rows = []
    for index in range(count):
        sample = generate_sample(index, seed=7, height=height, width=width)
        cams = np.stack([sample.cams[c - 1] for c in sample.labels])
        seed = refine_seed(sample.image, cams, list(sample.labels), config=SeedConfig())
        rows.append(
            {
                schema.IMAGE_ID: sample.image_id,
                schema.IMAGE: _png(sample.image),
                schema.HEIGHT: height,
                schema.WIDTH: width,
                schema.LABELS: list(sample.labels),
                schema.SEED: _png(seed),
                schema.GT: _png(sample.gt),
                schema.SPLIT: "val" if index >= count - val else "train",
            }
        )
    return rows


def make_refine_input(uri: str, *, count: int = 8, val: int = 2) -> mf.Manifest:
    """Writes and commits a refine output (one shard) at `uri`."""
    location = resolve(uri)
    stage = mf.StageOutput.open(location, stage="refine", config={"test": True}, inputs=[])
    rows = refine_rows(count, val=val)
    table = pa.Table.from_pylist(rows, schema=REFINE_SCHEMA)
    entry = mf.write_parquet(location, "shards/part-00000.parquet", table)
    return stage.commit(
        files=[entry],
        counts={"input": count, "output": count, "quarantined": 0},
        class_names=SYNTHETIC_CLASSES.class_names,
        class_space="custom",
    )
