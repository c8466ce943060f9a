"""Refine's unit of work: one row group of an input shard, refined in one Ray task.

`enumerate_units` reads the listed shards' footers (metadata only) and makes one unit per
(shard, row group). `process_unit` refines its rows (`pipelines.refine.rows`) and writes
`shards/<unit>.parquet`, `quarantine/<unit>.parquet` for rows it could not refine, and last
the completion record `_units/<unit>.json` (rows, files, per-split confusion matrices,
timings); `read_records` reads back what an earlier attempt finished, and `build_metrics`
sums the records' confusion matrices into the manifest's metrics.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import schema
from pipelines.io.manifest import Manifest, Quarantine, write_parquet
from pipelines.io.rows import RowRejected
from pipelines.io.storage import Location, read_json_objects, safe_relpath, write_bytes_atomic
from pipelines.metrics import ConfusionAccumulator
from pipelines.refine.rows import REFINE_SCHEMA, refine_row
from pipelines.seeds import SeedConfig

UNIT_DIR = "_units"  # completion records of finished units (bookkeeping, not data files)
SHARD_DIR = "shards"
NO_SPLIT = "(none)"  # metrics key of rows without a split
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
_FOOTER_THREADS = 16


@dataclass(frozen=True)
class WorkUnit:
    """One task: a row group of an input shard, and the name of everything it writes."""

    name: str  # "<shard stem>-rg<NNNN>"
    path: str  # input shard, relative to the input directory
    row_group: int
    rows: int


def unit_name(shard_path: str, row_group: int) -> str:
    stem = posixpath.basename(shard_path)
    stem = stem[: -len(".parquet")] if stem.endswith(".parquet") else stem
    return f"{stem}-rg{row_group:04d}"


def shard_rel(unit: str) -> str:
    return f"{SHARD_DIR}/{unit}.parquet"


def record_rel(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}.json"


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
            reasons[_reason_kind(exc.reason)] += 1
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


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def enumerate_units(input_loc: Location, manifest: Manifest) -> list[WorkUnit]:
    """One unit per row group of every shard the ingest manifest lists (footers only).

    Raises:
        ValueError: a listed shard lacks an ingest column, or two shards share a file name.
    """
    shards = [f.path for f in manifest.entries(f"{SHARD_DIR}/") if f.path.endswith(".parquet")]

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

    with ThreadPoolExecutor(max_workers=min(_FOOTER_THREADS, max(1, len(shards)))) as pool:
        units = [u for found in pool.map(footer, shards) for u in found]
    names = Counter(u.name for u in units)
    repeated = [n for n, c in names.items() if c > 1]
    if repeated:
        raise ValueError(
            f"input shards share file names (units {repeated[:3]}): cannot name outputs"
        )
    for u in units:
        safe_relpath(shard_rel(u.name))
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


def read_records(output_loc: Location, units: Iterable[WorkUnit]) -> dict[str, dict[str, Any]]:
    """Completion records of units an earlier attempt finished (one batched read).

    A record that is torn or does not match its unit is ignored: the unit is redone.
    """
    wanted = {u.name: u for u in units}
    found = read_json_objects(output_loc, {name: record_rel(name) for name in wanted})
    records = {}
    for name, record in found.items():
        unit = wanted[name]
        if (
            record.get("unit") == name
            and record.get("path") == unit.path
            and record.get("row_group") == unit.row_group
            and record.get("input_rows") == unit.rows
        ):
            records[name] = record
    return records


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def build_metrics(
    records: Iterable[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    class_space: str,
    bg_threshold: float,
) -> dict[str, Any] | None:
    """Manifest metrics from the units' confusion matrices; None when no row has GT."""
    k = len(class_names)
    totals: dict[str, dict[str, Any]] = {}
    for record in records:
        for split, conf in record["confusion"].items():
            acc = totals.setdefault(
                split,
                {
                    "images": 0,
                    "cam_argmax": ConfusionAccumulator(k),
                    "seeds": ConfusionAccumulator(k),
                },
            )
            acc["images"] += conf["images"]
            for key in ("cam_argmax", "seeds"):
                acc[key].merge(np.asarray(conf[key], dtype=np.int64))
    if not totals:
        return None
    overall = {key: ConfusionAccumulator(k) for key in ("cam_argmax", "seeds")}
    for acc in totals.values():
        for key in overall:
            overall[key].merge(acc[key].matrix)
    scores = {key: acc.score() for key, acc in overall.items()}
    result: dict[str, Any] = {
        "class_space": class_space,
        "num_classes": k,
        "ground_truth": "every row with ground truth, all splits (per split under by_split)",
        "gt_images": sum(acc["images"] for acc in totals.values()),
        "cam_argmax_bg_threshold": bg_threshold,
    }
    for key, score in scores.items():
        entry = score.as_dict(list(class_names))
        entry["miou"] = _finite(entry["miou"])
        result[key] = entry
    result["miou"] = result["seeds"]["miou"]
    result["per_class_iou"] = result["seeds"]["per_class_iou"]
    result["by_split"] = {
        split: {
            "images": acc["images"],
            "cam_argmax": _finite(acc["cam_argmax"].score().miou),
            "seeds": _finite(acc["seeds"].score().miou),
        }
        for split, acc in sorted(totals.items())
    }
    return result
