"""Refine's unit of work: one row group of an input shard, refined in one Ray task.

`enumerate_units` reads the listed shards' footers (metadata only) and makes one unit per
(shard, row group). `process_unit` refines its rows (`pipelines.refine.rows`) and writes
`shards/<unit>.parquet`, `quarantine/<unit>.parquet` for rows it could not refine, and last
the completion record `_units/<unit>.json` (rows, files, per-split confusion matrices,
timings); `record_matches` tells whether an earlier attempt's record is for this unit
(`pipelines.units.resume`), and `build_metrics` sums the records' confusion matrices into the
manifest's metrics. Names, records and resumption are `pipelines.units`'.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import schema
from pipelines.io.manifest import Manifest, Quarantine, write_parquet
from pipelines.io.rows import RowRejected
from pipelines.io.storage import Location, write_bytes_atomic
from pipelines.metrics import NO_SPLIT, ConfusionAccumulator, metrics_by_split, sum_by_split
from pipelines.refine.rows import REFINE_SCHEMA, refine_row
from pipelines.seeds import SeedConfig
from pipelines.units import (
    check_unit_names,
    listed_shards,
    map_shards,
    reason_kind,
    record_rel,
    shard_rel,
    unit_name,
)

__all__ = ["WorkUnit", "enumerate_units", "process_unit", "record_rel", "shard_rel"]
_REQUIRED_COLUMNS = (
    schema.IMAGE_ID,
    schema.IMAGE,
    schema.HEIGHT,
    schema.WIDTH,
    schema.LABELS,
    schema.CAM,
    schema.CAM_CLASSES,
    schema.GT,
)


@dataclass(frozen=True)
class WorkUnit:
    """One task: a row group of an input shard, and the name of everything it writes."""

    name: str  # "<shard stem>-rg<NNNN>"
    path: str  # input shard, relative to the input directory
    row_group: int
    rows: int


def _read_row_group(input_loc: Location, unit: WorkUnit) -> pa.Table:
    path = input_loc.join(unit.path)
    try:
        with input_loc.fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            columns = [c for c in schema.INGEST_COLUMNS if c in names]
            return parquet.read_row_group(unit.row_group, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(input_loc, unit.path, exc, f" (row group {unit.row_group})") from None


def process_unit(
    unit: WorkUnit,
    *,
    input_loc: Location,
    output_loc: Location,
    config: SeedConfig,
    num_classes: int,
) -> dict[str, Any]:
    """Refines one row group and writes its shard, quarantine and completion record (last).

    Returns:
        The completion record: `unit`, `path`, `row_group`, `input_rows`, `output`,
        `quarantined`, `files` (FileEntry dicts), `reasons`, `confusion` ({split: {"images",
        "cam_argmax", "seeds"}}, K x (K + 1) matrices as lists), `crf_s`, `task_s`.
    """
    started = time.perf_counter()
    table = _read_row_group(input_loc, unit)
    rows: list[dict[str, Any]] = []
    quarantine = Quarantine(output_loc)
    reasons: Counter[str] = Counter()
    confusion: dict[str, dict[str, Any]] = {}
    crf_seconds = 0.0
    bad = 0
    for row in table.to_pylist():
        try:
            refined = refine_row(row, config=config, num_classes=num_classes)
        except RowRejected as exc:
            source = row.get(schema.SOURCE) or f"{unit.path}#rg{unit.row_group}"
            quarantine.add(str(row.get(schema.IMAGE_ID)), str(source), exc.reason)
            reasons[reason_kind(exc.reason)] += 1
            bad += 1
            continue
        rows.append(refined.columns)
        crf_seconds += refined.crf_seconds
        if refined.gt is not None:
            split = refined.columns[schema.SPLIT] or NO_SPLIT
            acc = confusion.setdefault(
                split,
                {
                    "images": 0,
                    "cam_argmax": ConfusionAccumulator(num_classes),
                    "seeds": ConfusionAccumulator(num_classes),
                },
            )
            acc["images"] += 1
            acc["cam_argmax"].add(refined.argmax, refined.gt)
            acc["seeds"].add(refined.seed, refined.gt)
    files: list[dict[str, Any]] = []
    if rows:
        entry = write_parquet(
            output_loc, shard_rel(unit.name), pa.Table.from_pylist(rows, schema=REFINE_SCHEMA)
        )
        files.append(asdict(entry))
    q_entry = quarantine.flush(unit.name)
    if q_entry is not None:
        files.append(asdict(q_entry))
    record = {
        "unit": unit.name,
        "path": unit.path,
        "row_group": unit.row_group,
        "input_rows": table.num_rows,
        "output": len(rows),
        "quarantined": bad,
        "files": files,
        "reasons": dict(reasons),
        "confusion": {
            split: {
                "images": acc["images"],
                "cam_argmax": acc["cam_argmax"].matrix.tolist(),
                "seeds": acc["seeds"].matrix.tolist(),
            }
            for split, acc in confusion.items()
        },
        "crf_s": crf_seconds,
        "task_s": time.perf_counter() - started,
    }
    write_bytes_atomic(output_loc, record_rel(unit.name), json.dumps(record).encode())
    return record


def refine_units(
    batch: dict[str, np.ndarray],
    *,
    input_loc: Location,
    output_loc: Location,
    config: SeedConfig,
    num_classes: int,
) -> dict[str, np.ndarray]:
    """Ray Data batch wrapper of `process_unit`: column `unit` (JSON `WorkUnit`) in, `record`
    (JSON completion record) out, one row per unit."""
    records = []
    for unit_json in batch["unit"]:
        unit = WorkUnit(**json.loads(unit_json))
        record = process_unit(
            unit, input_loc=input_loc, output_loc=output_loc, config=config, num_classes=num_classes
        )
        records.append(json.dumps(record))
    return {"record": np.asarray(records, dtype=object)}


def enumerate_units(input_loc: Location, manifest: Manifest) -> list[WorkUnit]:
    """One unit per row group of every shard the ingest manifest lists (footers only).

    Raises:
        ValueError: a listed shard lacks an ingest column, or two shards share a file name.
    """

    def footer(path: str) -> list[WorkUnit]:
        try:
            with input_loc.fs.open(input_loc.join(path), "rb") as f:
                meta = pq.ParquetFile(f).metadata
                names = set(meta.schema.to_arrow_schema().names)
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(input_loc, path, exc) from None
        missing = [c for c in _REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path} is not an ingest shard: no column(s) {', '.join(missing)}")
        return [
            WorkUnit(unit_name(path, i), path, i, meta.row_group(i).num_rows)
            for i in range(meta.num_row_groups)
        ]

    units = [u for found in map_shards(footer, listed_shards(manifest)) for u in found]
    check_unit_names(u.name for u in units)
    return units


def _unreadable(input_loc: Location, path: str, exc: BaseException, where: str = "") -> Exception:
    """A one-line error naming the input shard that cannot be read (missing or corrupt)."""
    uri = input_loc.child(path).uri
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"input shard {uri} is listed in the input manifest but missing")
    detail = " ".join(str(exc).split())
    message = f"input shard {uri}{where} is unreadable: {type(exc).__name__}: {detail}"
    # An OSError stays one (it may be a storage failure that retries should see as such).
    return OSError(message) if isinstance(exc, OSError) else ValueError(message)


def record_matches(unit: WorkUnit, record: Mapping[str, Any]) -> bool:
    """Whether a completion record found on disk is this unit's (same shard, group, rows)."""
    return (
        record.get("unit") == unit.name
        and record.get("path") == unit.path
        and record.get("row_group") == unit.row_group
        and record.get("input_rows") == unit.rows
    )


def build_metrics(
    records: Iterable[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    class_space: str,
    bg_threshold: float,
) -> dict[str, Any] | None:
    """Manifest metrics from the units' confusion matrices; None when no row has GT."""
    keys = ("cam_argmax", "seeds")
    totals = sum_by_split(records, keys, len(class_names), _add_dense)
    if not totals:
        return None
    return metrics_by_split(
        totals,
        keys,
        class_names,
        class_space=class_space,
        ground_truth="every row with ground truth, all splits (per split under by_split)",
        headline="seeds",
        extra={"cam_argmax_bg_threshold": bg_threshold},
    )


def _add_dense(matrix: np.ndarray, counts: Sequence[Sequence[int]]) -> None:
    dense = np.asarray(counts, dtype=np.int64)
    if dense.shape != matrix.shape:
        raise ValueError(f"confusion matrix of shape {dense.shape}, expected {matrix.shape}")
    matrix += dense
