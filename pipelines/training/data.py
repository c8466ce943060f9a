"""The data design both training stages share: epochs of work units, one Ray Data task each.

A unit is (epoch, shard, row group) of a stage output's listed shards (`epoch_units`: each
epoch visits the row groups in its own order); its task reads that row group only, keeps the
training rows in an order drawn from (seed, epoch, row group) and yields blocks of them
(`unit_blocks`), which the stage decodes and augments. Every row's augmentation draws from
(seed, epoch, image id) (`pipelines.training.augment.row_seed`), so a sample depends on nothing
else; the dataset chains every epoch the run still needs, so a worker's stream never ends early.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.io import schema
from pipelines.io.manifest import Manifest
from pipelines.io.parquet import read_row_group, read_shards
from pipelines.io.storage import Location
from pipelines.training.augment import row_seed

IMAGE_COLUMNS = (schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH)  # image + size


def read_row_groups(output: Manifest, columns: Sequence[str]) -> list[tuple[str, int, pa.Table]]:
    """(path, row group, table of `columns`) for every row group of the Parquet shards an
    output's manifest lists (`shards/*.parquet`).

    A missing optional column (a source without `split`) reads as nulls.

    Raises:
        ValueError: no shards listed.
    """
    location = output.location
    paths = [f.path for f in output.entries("shards/") if f.path.endswith(".parquet")]
    if not paths:
        raise ValueError(f"{location.uri}: the manifest lists no shards/")
    found = []
    for path, shard in zip(paths, read_shards(location, paths, columns), strict=True):
        for group, table in enumerate(shard.groups):
            for name in columns:
                if name not in shard.names:
                    table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
            found.append((path, group, table.select(list(columns))))
    return found


def epochs_needed(*, rows: int, batch_size: int, start_iteration: int, iterations: int) -> int:
    """Epochs of data a run from `start_iteration` to `iterations` consumes, plus one spare.

    The spare covers rows dropped to keep the workers' shards equal and partial last batches.

    Raises:
        ValueError: no training rows.
    """
    if rows <= 0:
        raise ValueError("the input has no training rows")
    images = (iterations - start_iteration) * batch_size
    return max(1, math.ceil(images / rows)) + 1


def epoch_units(
    groups: Sequence[tuple[str, int]], *, rows: int, start_iteration: int, train: Any
) -> list[dict[str, Any]]:
    """One work unit per (epoch, source row group) of the `epochs_needed` by a run of `train`
    (a training config: `seed`, `batch_size`, `iterations`) over `rows` training rows from the
    epoch `start_iteration` is in, each epoch's groups in its own order."""
    batch_size, seed, iterations = train.batch_size, train.seed, train.iterations
    epochs = epochs_needed(
        rows=rows, batch_size=batch_size, start_iteration=start_iteration, iterations=iterations
    )
    start_epoch = (start_iteration * batch_size) // rows
    units = []
    for epoch in range(start_epoch, start_epoch + epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(groups))
        units += [{"epoch": epoch, "path": groups[i][0], "row_group": groups[i][1]} for i in order]
    return units


def unit_blocks(
    batch: Mapping[str, np.ndarray],
    *,
    source: Location,
    columns: Sequence[str],
    keep: Callable[[Mapping[str, Any]], bool],
    seed: int,
    rows_per_block: int,
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(epoch, at most `rows_per_block` rows) blocks of the units of a Ray Data batch: the
    rows of each unit's row group that `keep` selects, in an order drawn from the unit."""
    for epoch, path, group in zip(batch["epoch"], batch["path"], batch["row_group"], strict=True):
        table = read_row_group(source, str(path), int(group), columns)
        rows = [row for row in table.to_pylist() if keep(row)]
        rng = np.random.default_rng(row_seed(seed, int(epoch), f"{path}#{group}"))
        rows = [rows[i] for i in rng.permutation(len(rows))]
        for start in range(0, len(rows), rows_per_block):
            yield int(epoch), rows[start : start + rows_per_block]


def stack(rows: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """One batch of prepared rows: `keys` stacked along a new first axis (B x ...)."""
    return {key: np.stack([row[key] for row in rows]) for key in keys}


def unit_dataset(
    units: Sequence[Mapping[str, Any]],
    fn: Callable[[dict[str, np.ndarray]], Iterator[dict[str, np.ndarray]]],
    *,
    num_cpus_per_task: float,
) -> Any:
    """The Ray Dataset of `fn` over `units`, one CPU task per unit."""
    import ray.data

    return ray.data.from_items(list(units), override_num_blocks=len(units)).map_batches(
        fn, batch_size=1, batch_format="numpy", num_cpus=num_cpus_per_task
    )
