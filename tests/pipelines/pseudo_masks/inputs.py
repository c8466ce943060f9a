"""Small inputs for the pseudo-mask tests: ingest/refine outputs and a tiny exported model."""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.ingest.rows import SHARD_SCHEMA
from pipelines.io import manifest as mf
from pipelines.io import schema
from pipelines.io.codecs import encode_label_png
from pipelines.io.storage import resolve, write_bytes_atomic
from pipelines.refine.rows import REFINE_SCHEMA
from pipelines.seeds import SeedConfig, refine_seed
from pipelines.synthetic.dataset import ingest_row
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample
from pipelines.train.export import EXPORT_FORMAT, export_model
from weakclip.build import build_weakclip
from weakclip.config import InferenceConfig, WeakCLIPConfig, preset

HEIGHT, WIDTH = 64, 80
CLASS_NAMES = SYNTHETIC_CLASSES.class_names


def ingest_rows(count: int, *, val: int = 0, seed: int = 3) -> list[dict[str, Any]]:
    """`count` synthetic ingest rows of HEIGHT x WIDTH; the last `val` in the val split."""
    return [
        ingest_row(
            generate_sample(i, seed=seed, height=HEIGHT, width=WIDTH),
            split="val" if i >= count - val else "train",
        )
        for i in range(count)
    ]


def write_shard_output(
    uri: str,
    rows: list[dict[str, Any]],
    *,
    stage: str,
    rows_per_group: int = 3,
    inputs: list[mf.InputRef] | None = None,
    class_names: tuple[str, ...] = CLASS_NAMES,
) -> mf.Manifest:
    """Commits `rows` as a one-shard `stage` output at `uri` (row groups of `rows_per_group`)."""
    location = resolve(uri)
    out = mf.StageOutput.open(
        location, stage=stage, config={"test": len(rows)}, inputs=inputs or []
    )
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA if stage == "ingest" else REFINE_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=rows_per_group)
    rel = "shards/part-00000.parquet"
    write_bytes_atomic(location, rel, buffer.getvalue())
    return out.commit(
        files=[mf.FileEntry(rel, table.num_rows, len(buffer.getvalue()))],
        counts={"input": len(rows), "output": len(rows), "quarantined": 0},
        class_names=class_names,
        class_space="custom",
    )


def refine_rows_from(ingest: list[dict[str, Any]], *, seed: int = 3) -> list[dict[str, Any]]:
    """Refine rows (WeakTr CRF seeds) for the same synthetic samples as `ingest`."""
    rows = []
    for index, row in enumerate(ingest):
        sample = generate_sample(index, seed=seed, height=HEIGHT, width=WIDTH)
        cams = np.stack([sample.cams[c - 1] for c in sample.labels])
        seeds = refine_seed(sample.image, cams, list(sample.labels), config=SeedConfig())
        rows.append(
            {
                schema.IMAGE_ID: row[schema.IMAGE_ID],
                schema.IMAGE: row[schema.IMAGE],
                schema.HEIGHT: row[schema.HEIGHT],
                schema.WIDTH: row[schema.WIDTH],
                schema.LABELS: row[schema.LABELS],
                schema.SEED: encode_label_png(seeds),
                schema.GT: row[schema.GT],
                schema.SPLIT: row[schema.SPLIT],
            }
        )
    return rows


def tiny_config() -> WeakCLIPConfig:
    """The tiny preset at 64 px with one-window inference: fast on CPU."""
    config = preset("tiny")
    return dataclasses.replace(
        config,
        clip=dataclasses.replace(config.clip, input_size=64),
        inference=InferenceConfig(scales=(1.0,), short_side=64, window=64, stride=48),
    )


def make_checkpoint(path: str, *, seed: int = 0, class_names=CLASS_NAMES) -> str:
    """A randomly initialised tiny WeakCLIP exported as train's model.pt; returns `path`."""
    torch.manual_seed(seed)
    config = tiny_config()
    model = build_weakclip(config, class_names)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    export_model(
        path,
        model=model,
        config=config,
        class_names=class_names,
        clip_source=None,
        clip_sha256="random",
        iteration=0,
    )
    return path


class _RunsCode:
    """Pickles as a call to os.system: loading it with plain pickle runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def make_malicious_checkpoint(path: str, sentinel: str) -> str:
    """A torch.save file whose unpickling would create `sentinel` (os.system)."""
    payload = {
        "format": EXPORT_FORMAT,
        "class_names": list(CLASS_NAMES),
        "x": _RunsCode(f"touch {sentinel}"),
    }
    torch.save(payload, path)
    return path
