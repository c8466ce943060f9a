"""Retraining data: pseudo-mask index ⋈ source images, mask checks, and the training stream.

Inputs (docs/CONTRACTS.md): a `pseudo_masks` output (index shards: `image_id`, `mask`, `height`,
`width`, `split`; one palette PNG per image) and its `inputs[0]`, the ingest or refine output
the images came from. Only listed files are read. `plan_rows` is the join. The stream follows
`pipelines.training.data`; batches (`TRAIN_COLUMNS`): `image` B x 3 x S x S float32 normalised
crops and `mask` B x S x S uint8 (255 = ignore).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipelines.io import schema
from pipelines.io.codecs import decode_label_map, decode_rgb
from pipelines.io.manifest import Manifest
from pipelines.io.storage import Location, read_many, safe_relpath
from pipelines.training import data as shared
from pipelines.training.augment import AugmentConfig, augment_sample, row_seed

TRAIN_COLUMNS = ("image", "mask")
VAL_SPLIT = "val"
INDEX_COLUMNS = (schema.IMAGE_ID, schema.MASK, schema.HEIGHT, schema.WIDTH)
SOURCE_COLUMNS = (schema.IMAGE_ID, schema.HEIGHT, schema.WIDTH, schema.SPLIT, schema.GT)
_FETCH_CHUNK = 64  # masks per batched read
_THREADS = 8


@dataclass(frozen=True)
class IndexRow:
    """One row of the pseudo-mask index."""

    image_id: str
    mask: str  # relative path inside the pseudo-mask output
    height: int
    width: int


@dataclass(frozen=True)
class SourceRow:
    """What the join needs of one source row (no image bytes)."""

    height: int
    width: int
    split: str | None
    has_gt: bool
    path: str  # the shard holding it (relative to the source output)
    row_group: int  # its row group in that shard


@dataclass(frozen=True)
class RowPlan:
    """The outcome of the join."""

    train: dict[str, str]  # image id → mask path (relative to the pseudo-mask output)
    val: dict[str, tuple[str, int]]  # image id scored after training → (shard, row group)
    groups: list[tuple[str, int]]  # (shard, row group) of the source holding training rows
    quarantined: list[tuple[str, str, str]]  # (image id, mask path, reason)
    index_rows: int  # rows of the index, quarantined ones included


def read_index(pseudo: Manifest) -> list[IndexRow]:
    """The index rows of a pseudo-mask output (its listed `shards/*.parquet`)."""
    return [
        IndexRow(str(r[schema.IMAGE_ID]), str(r[schema.MASK]), r[schema.HEIGHT], r[schema.WIDTH])
        for _, _, table in shared.read_row_groups(pseudo, INDEX_COLUMNS)
        for r in table.to_pylist()
    ]


def read_source_rows(source: Manifest) -> dict[str, SourceRow]:
    """id → size, split, ground truth or not, and where the row is, for every source row.

    Raises:
        ValueError: an image id appears twice in the source.
    """
    rows: dict[str, SourceRow] = {}
    for path, group, table in shared.read_row_groups(source, SOURCE_COLUMNS):
        has_gt = pc.is_valid(table[schema.GT]).to_pylist()
        for row, gt in zip(table.drop_columns([schema.GT]).to_pylist(), has_gt, strict=True):
            image_id = str(row[schema.IMAGE_ID])
            if image_id in rows:
                raise ValueError(f"{source.location.uri}: image id {image_id!r} appears twice")
            rows[image_id] = SourceRow(
                row[schema.HEIGHT], row[schema.WIDTH], row[schema.SPLIT], gt, path, group
            )
    return rows


def check_masks(
    location: Location, rows: Sequence[IndexRow], *, num_classes: int
) -> dict[str, str | None]:
    """Fetches and validates every row's mask: image id → None (usable) or the reason.

    Reads in chunks of batched requests (a thread per chunk); the masks are not kept.
    """

    def check_chunk(chunk: Sequence[IndexRow]) -> dict[str, str | None]:
        got = read_many(location, [row.mask for row in chunk])  # storage errors raise
        result: dict[str, str | None] = {}
        for row in chunk:
            data = got[row.mask]
            if isinstance(data, FileNotFoundError):
                result[row.image_id] = f"mask missing: {row.mask}"
            else:
                try:
                    decode_label_map(data, "mask", (row.height, row.width), num_classes=num_classes)
                    result[row.image_id] = None
                except ValueError as error:
                    result[row.image_id] = f"bad mask: {row.mask}: {error}"
        return result

    chunks = [rows[i : i + _FETCH_CHUNK] for i in range(0, len(rows), _FETCH_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(chunks)))) as pool:
        return {key: why for part in pool.map(check_chunk, chunks) for key, why in part.items()}


def plan_rows(
    index: Sequence[IndexRow],
    source: Mapping[str, SourceRow],
    *,
    listed: set[str],
    mask_problems: Mapping[str, str | None] | None = None,
) -> RowPlan:
    """The join of the index with `read_source_rows` (pure): training rows are the index rows
    whose mask is usable (else quarantined with the reason), val rows the source rows of split
    `val` with ground truth that are not in the index at all. `listed`: files of the pseudo-mask
    manifest; `mask_problems` (`check_masks`): id → reason or None, ids absent there taken as
    usable (the structural checks still apply)."""
    problems = mask_problems or {}
    train: dict[str, str] = {}
    quarantined: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for row in index:
        reason = _join_problem(row, source.get(row.image_id), seen=seen, listed=listed)
        if reason is None:
            reason = problems.get(row.image_id)
        seen.add(row.image_id)
        if reason is None:
            train[row.image_id] = row.mask
        else:
            quarantined.append((row.image_id, row.mask, reason))
    val = {
        image_id: (src.path, src.row_group)
        for image_id, src in sorted(source.items())
        if src.split == VAL_SPLIT and src.has_gt and image_id not in seen
    }
    groups = sorted({(source[i].path, source[i].row_group) for i in train})
    return RowPlan(train, val, groups, quarantined, index_rows=len(index))


def _join_problem(
    row: IndexRow, src: SourceRow | None, *, seen: set[str], listed: set[str]
) -> str | None:
    """Why an index row cannot be joined to its image and mask (None: it can)."""
    if row.image_id in seen:
        return "image id listed twice in the index"
    if src is None:
        return "image not in the pseudo masks' input"
    if (src.height, src.width) != (row.height, row.width):
        return f"index says {row.height}x{row.width}, the input image is {src.height}x{src.width}"
    try:
        mask = safe_relpath(row.mask)
    except ValueError as error:
        return f"unsafe mask path: {error}"
    if mask != row.mask or mask not in listed:
        return f"mask {row.mask} is not a file of the pseudo-mask manifest"
    return None


def augment_units(
    batch: dict[str, np.ndarray],
    *,
    source: Location,
    masks: Location,
    train: Mapping[str, str],
    augment: AugmentConfig,
    seed: int,
    rows_per_block: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: work units in, `TRAIN_COLUMNS` blocks of training rows out
    (each block's masks fetched in one batched read, each row's draws from (seed, epoch, id))."""
    for epoch, rows in shared.unit_blocks(
        batch,
        source=source,
        columns=shared.IMAGE_COLUMNS,
        keep=lambda row: str(row[schema.IMAGE_ID]) in train,
        seed=seed,
        rows_per_block=rows_per_block,
    ):
        paths = [masks.join(train[str(row[schema.IMAGE_ID])]) for row in rows]
        got = masks.fs.cat(paths) if paths else {}
        prepared = []
        for row, path in zip(rows, paths, strict=True):
            height, width = int(row[schema.HEIGHT]), int(row[schema.WIDTH])
            rgb = decode_rgb(row[schema.IMAGE], height, width)
            mask = decode_label_map(got[path], "mask", (height, width))
            rng = np.random.default_rng(row_seed(seed, epoch, str(row[schema.IMAGE_ID])))
            image, crop = augment_sample(rgb, mask, rng=rng, config=augment)
            prepared.append({"image": image, "mask": crop})
        yield shared.stack(prepared, TRAIN_COLUMNS)


def build_retrain_dataset(
    source: Manifest,
    *,
    masks: Location,
    rows: RowPlan,
    config: Any,
    start_iteration: int,
    num_cpus_per_task: float,
    rows_per_block: int = 8,
) -> Any:
    """The Ray Dataset of the augmented training rows of `source` (`rows.train`: id → mask path
    under `masks`) for the epochs a `RetrainConfig` run from `start_iteration` still needs, one
    task per (epoch, group) unit (`pipelines.training.data.epoch_units`)."""
    units = shared.epoch_units(
        rows.groups, rows=len(rows.train), start_iteration=start_iteration, train=config
    )
    fn = functools.partial(
        augment_units,
        source=source.location,
        masks=masks,
        train=dict(rows.train),
        augment=config.augment(),
        seed=config.seed,
        rows_per_block=rows_per_block,
    )
    return shared.unit_dataset(units, fn, num_cpus_per_task=num_cpus_per_task)
