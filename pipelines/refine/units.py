"""Refine's unit of work: consecutive row groups of the input shards, about `rows_per_unit`
rows (`enumerate_units`, from the footers; by default sized for ~96 MiB output shards),
refined as part tasks over its rows (`refine_part`, `pipelines.parts`) and written by
`finish_unit`; `build_metrics` sums the records' confusion matrices into the manifest's
metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.io import schema
from pipelines.io.manifest import Manifest
from pipelines.io.parquet import Shard, read_row_group, read_shard
from pipelines.io.rows import RowRejected
from pipelines.io.storage import Location
from pipelines.metrics import (
    NO_SPLIT,
    ConfusionAccumulator,
    add_sparse,
    sum_by_split,
    summed_metrics,
    to_sparse,
)
from pipelines.refine.rows import REFINE_SCHEMA, refine_row
from pipelines.seeds import SeedConfig
from pipelines.units import (
    ROWS_PER_GROUP,
    check_unit_names,
    group_row_groups,
    listed_shards,
    map_shards,
    rows_per_unit_for,
    unit_fields,
    unit_name,
    write_unit,
)

METRIC_KEYS = ("cam_argmax", "seeds")
_REQUIRED_COLUMNS = schema.INGEST_COLUMNS[: schema.INGEST_COLUMNS.index(schema.SOURCE)]
# the input columns a refine row carries on, and what its seed PNG adds when there is no GT
_CARRIED = tuple(c for c in schema.REFINE_COLUMNS if c in schema.INGEST_COLUMNS)
_SEED_BYTES_WITHOUT_GT = 4096


@dataclass(frozen=True)
class WorkUnit:
    """One unit: consecutive row groups of the input, and the name of everything it writes."""

    name: str  # `unit_name` of its first row group: "<shard stem>-rg<NNNN>"
    pieces: tuple[tuple[str, int, int], ...]  # (input shard, row group, rows), in order
    rows: int


def process_unit(
    unit: WorkUnit,
    *,
    input_loc: Location,
    output_loc: Location,
    config: SeedConfig,
    num_classes: int,
) -> dict[str, Any]:
    """Refines one unit in this process (`refine_part` of all its rows, `finish_unit`)."""
    fields = asdict(unit)
    part = refine_part(
        fields, 0, unit.rows, input_loc=input_loc, config=config, num_classes=num_classes
    )
    return finish_unit(fields, part, output_loc=output_loc, num_classes=num_classes)


def refine_part(
    unit: Mapping[str, Any],
    start: int,
    stop: int,
    *,
    input_loc: Location,
    config: SeedConfig,
    num_classes: int,
) -> dict[str, Any]:
    """Refines rows `[start, stop)` of a unit (of the concatenation of its row groups; a
    `pipelines.parts` part task): `{"table"` (REFINE_SCHEMA), `"rejected"` ([(image id, source,
    reason)]), `"confusion"` ({split: {"images", "cam_argmax", "seeds"}}, K x (K + 1) int64
    arrays), `"input_rows"`, `"crf_s"`, `"task_s"`, `"task_cpu_s"` (this process's CPU
    seconds)}`. Only the row groups that hold these rows are read."""
    started, cpu_started = time.perf_counter(), time.process_time()
    rows: list[dict[str, Any]] = []
    rejected: list[tuple[str, str, str]] = []
    confusion: dict[str, dict[str, Any]] = {}
    crf_seconds, input_rows = 0.0, 0
    for where, table in _read_range(unit, start, stop, input_loc):  # one row group at a time
        input_rows += table.num_rows
        for row in table.to_pylist():
            try:
                refined = refine_row(row, config=config, num_classes=num_classes)
            except RowRejected as exc:
                source = row.get(schema.SOURCE) or where
                rejected.append((str(row.get(schema.IMAGE_ID)), str(source), exc.reason))
                continue
            rows.append(refined.columns)
            crf_seconds += refined.crf_seconds
            if refined.gt is not None:
                acc = confusion.setdefault(
                    refined.columns[schema.SPLIT] or NO_SPLIT,
                    {"images": 0, **{k: ConfusionAccumulator(num_classes) for k in METRIC_KEYS}},
                )
                acc["images"] += 1
                acc["cam_argmax"].add(refined.argmax, refined.gt)
                acc["seeds"].add(refined.seed, refined.gt)
    return {
        "table": pa.Table.from_pylist(rows, schema=REFINE_SCHEMA),
        "rejected": rejected,
        "confusion": {
            split: {k: v if k == "images" else v.matrix for k, v in acc.items()}
            for split, acc in confusion.items()
        },
        "input_rows": input_rows,
        "crf_s": crf_seconds,
        "task_s": time.perf_counter() - started,
        "task_cpu_s": time.process_time() - cpu_started,
    }


def _read_range(
    unit: Mapping[str, Any], start: int, stop: int, input_loc: Location
) -> Iterator[tuple[str, pa.Table]]:
    """("<shard>#rg<N>", the rows of that row group within `[start, stop)` of the unit), one
    row group read at a time, only those that hold such rows."""
    offset = 0
    for path, group, rows_in_group in unit["pieces"]:
        low, high = max(start, offset), min(stop, offset + int(rows_in_group))
        if low < high:
            try:
                table = read_row_group(input_loc, str(path), int(group), schema.INGEST_COLUMNS)
            except (OSError, pa.ArrowException) as exc:
                raise _unreadable(input_loc, str(path), exc, f" (row group {group})") from None
            yield f"{path}#rg{group}", table.slice(low - offset, high - low)
        offset += int(rows_in_group)


def finish_unit(
    unit: Mapping[str, Any], *parts: Mapping[str, Any], output_loc: Location, num_classes: int
) -> dict[str, Any]:
    """Writes a unit's shard (its parts' rows in order), quarantine and, last, its completion
    record, returned: `write_unit`'s with `input_rows`, `output`, `confusion` (the parts'
    summed, sparse: `metrics.to_sparse`), `crf_s`, `task_s`, `task_cpu_s` (summed), `parts`."""
    confusion = sum_by_split(parts, METRIC_KEYS, num_classes, _add_counts)
    table = pa.concat_tables([p["table"] for p in parts]).combine_chunks()
    record = {
        **unit_fields(WorkUnit(**unit)),
        "input_rows": sum(p["input_rows"] for p in parts),
        "output": table.num_rows,
        "confusion": {
            split: {k: v if k == "images" else to_sparse(v) for k, v in acc.items()}
            for split, acc in confusion.items()
        },
        "crf_s": sum(p["crf_s"] for p in parts),
        "task_s": sum(p["task_s"] for p in parts),
        "task_cpu_s": sum(p["task_cpu_s"] for p in parts),
        "parts": len(parts),
    }
    rejected = [r for p in parts for r in p["rejected"]]
    return write_unit(
        output_loc,
        str(unit["name"]),
        record,
        table=table,
        rejected=rejected,
        rows_per_group=ROWS_PER_GROUP,  # what pseudo masks and training read at once
    )


def enumerate_units(
    input_loc: Location, manifest: Manifest, rows_per_unit: int | None = None
) -> tuple[list[WorkUnit], int]:
    """(units, rows per unit): the row groups of every shard the ingest manifest lists (footers
    only, read in parallel), gathered into units of whole row groups of at most `rows_per_unit`
    rows (`units.group_row_groups`); None: sized for ~96 MiB output shards from the carried
    columns' bytes (`refine_row_bytes`).

    Raises:
        ValueError: a listed shard lacks an ingest column, or two units share a name.
    """
    paths = listed_shards(manifest)

    def footer(path: str) -> Shard:
        try:
            shard = read_shard(input_loc, path, required=_REQUIRED_COLUMNS)
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(input_loc, path, exc) from None
        if shard.missing:
            missing = ", ".join(shard.missing)
            raise ValueError(f"{path} is not an ingest shard: no column(s) {missing}")
        return shard

    shards = map_shards(footer, paths)
    if rows_per_unit is None:
        rows_per_unit = rows_per_unit_for(refine_row_bytes(shards))
    grouped = group_row_groups(
        [(p, s.rows) for p, s in zip(paths, shards, strict=True)], rows_per_unit
    )
    units = [
        WorkUnit(unit_name(pieces[0][0], pieces[0][1]), tuple(pieces), sum(p[2] for p in pieces))
        for pieces in grouped
    ]
    check_unit_names(u.name for u in units)
    return units, rows_per_unit


def refine_row_bytes(shards: Sequence[Shard]) -> float:
    """Estimated bytes of a refine row from input footers: the columns it carries on, plus a
    seed PNG as large as the GT PNG (or 4 KB without GT)."""
    rows = sum(sum(s.rows) for s in shards)
    if rows == 0:
        return 0.0
    carried = sum(s.column_bytes.get(c, 0) for s in shards for c in _CARRIED)
    gt = sum(s.column_bytes.get(schema.GT, 0) for s in shards)
    return (carried + (gt or _SEED_BYTES_WITHOUT_GT * rows)) / rows


def _unreadable(input_loc: Location, path: str, exc: BaseException, where: str = "") -> Exception:
    """A one-line error naming the input shard that cannot be read (missing or corrupt)."""
    uri = input_loc.child(path).uri
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"input shard {uri} is listed in the input manifest but missing")
    detail = " ".join(str(exc).split())
    message = f"input shard {uri}{where} is unreadable: {type(exc).__name__}: {detail}"
    # An OSError stays one (it may be a storage failure that retries should see as such).
    return OSError(message) if isinstance(exc, OSError) else ValueError(message)


def build_metrics(
    records: Iterable[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    class_space: str,
    bg_threshold: float,
) -> dict[str, Any] | None:
    """Manifest metrics from the units' confusion matrices; None when no row has GT."""
    return summed_metrics(
        records,
        METRIC_KEYS,
        class_names,
        _add_counts,
        class_space=class_space,
        ground_truth="every row with ground truth, all splits (per split under by_split)",
        extra={"cam_argmax_bg_threshold": bg_threshold},
    )


def _add_counts(matrix: np.ndarray, counts: Mapping[str, Any] | Sequence[Sequence[int]]) -> None:
    """Adds a record's counts: sparse, or dense K x (K + 1) (a part's array, or the lists of
    records written before they were sparse: an output resumed across that change)."""
    if isinstance(counts, Mapping):
        add_sparse(matrix, counts)
        return
    dense = np.asarray(counts, dtype=np.int64)
    if dense.shape != matrix.shape:
        raise ValueError(f"confusion matrix of shape {dense.shape}, expected {matrix.shape}")
    matrix += dense
