"""Units of the pseudo-mask stage: enumeration, completion records, resumption and metrics.

A unit is one row group of an input shard. The driver enumerates them from the shards the
input manifest lists, reading only each shard's footer and its `image_id` and `split` columns:
that gives every unit's number of rows in the chosen splits (what the unit must return before
it is complete) and finds repeated image ids, whose later copies are quarantined rather than
written over the first one's mask. When all rows of a unit are back, `finish_unit` writes its
index shard and quarantine file, and last its record `_units/<unit>.json`, which lists every
file of the unit (masks included) with its size; a resumed run trusts a record only when it
`record_matches` its unit and all of those files are still there with those sizes
(`pipelines.units.resume`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import schema
from pipelines.io.manifest import Manifest, Quarantine, write_parquet
from pipelines.io.storage import Location, write_bytes_atomic
from pipelines.metrics import NO_SPLIT, metrics_by_split, sum_by_split
from pipelines.pseudo_masks.rows import (
    PseudoUnit,
    RowSpec,
    add_sparse,
    in_splits,
    mask_rel,
    to_sparse,
)
from pipelines.units import (
    check_unit_names,
    listed_shards,
    map_shards,
    reason_kind,
    record_rel,
    shard_rel,
    unit_name,
)

PSEUDO_MASK_SCHEMA = pa.schema(
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
assert tuple(PSEUDO_MASK_SCHEMA.names) == schema.PSEUDO_MASK_COLUMNS
_REQUIRED = {
    "ingest": (schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.CAM),
    "refine": (schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.SEED),
}


def enumerate_units(
    input_loc: Location, manifest: Manifest, *, splits: tuple[str, ...] | None
) -> list[PseudoUnit]:
    """One unit per row group of every listed shard, with its selected rows and duplicates.

    Raises:
        ValueError: a shard lacks a required column, or two shards share a file name.
    """
    shards = listed_shards(manifest)
    required = _REQUIRED[manifest.stage]

    def scan(path: str) -> list[tuple[int, list[Any], list[Any]]]:
        with input_loc.fs.open(input_loc.join(path), "rb") as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            missing = [c for c in required if c not in names]
            if missing:
                raise ValueError(
                    f"{path} is not a {manifest.stage} shard: no column(s) {', '.join(missing)}"
                )
            columns = [schema.IMAGE_ID] + ([schema.SPLIT] if schema.SPLIT in names else [])
            groups = []
            for group in range(parquet.metadata.num_row_groups):
                table = parquet.read_row_group(group, columns=columns)
                ids = table.column(schema.IMAGE_ID).to_pylist()
                split = (
                    table.column(schema.SPLIT).to_pylist()
                    if schema.SPLIT in columns
                    else [None] * len(ids)
                )
                groups.append((group, ids, split))
            return groups

    scanned = map_shards(scan, shards)
    seen: set[str] = set()
    units = []
    for path, groups in zip(shards, scanned, strict=True):
        for group, ids, split in groups:
            duplicates: dict[str, str] = {}
            selected = 0
            for index, (image_id, row_split) in enumerate(zip(ids, split, strict=True)):
                if not in_splits(row_split, splits):
                    continue
                selected += 1
                if image_id in seen:
                    duplicates[str(index)] = "duplicate image id (an earlier row has it)"
                seen.add(image_id)
            units.append(
                PseudoUnit(unit_name(path, group), path, group, len(ids), selected, duplicates)
            )
    check_unit_names(u.name for u in units)
    return units


def record_matches(unit: PseudoUnit, record: Mapping[str, Any]) -> bool:
    """Whether a record found on disk is this unit's (same name, shard, group, rows, splits,
    duplicates); `pipelines.units.resume` then checks its files (masks included) are intact."""
    layout = {key: field for key, field in asdict(unit).items() if key != "name"}
    return record.get("unit") == unit.name and all(
        record.get(key) == field for key, field in layout.items()
    )


def finish_unit(
    unit: PseudoUnit,
    rows: Sequence[Mapping[str, Any]],
    output_loc: Location,
    checkpoint_sha256: str,
    spec: RowSpec,
) -> dict[str, Any]:
    """Writes a complete unit's index shard, quarantine file and (last) its record.

    Args:
        unit: the unit.
        rows: the `meta` of each of its selected rows, as the last stage returned them.
        output_loc: the stage output.
        checkpoint_sha256: recorded in every index row.
        spec: class space and baseline name.

    Returns:
        The record: the unit's fields, `output`, `quarantined`, `files` (FileEntry dicts),
        `images` ([image id, row index] of written masks), `reasons`, `confusion` ({split:
        {"images", "pseudo_masks", <baseline>}} as sparse counts), `infer_s`, `crf_s`.
    """
    by_row = {int(r["row"]): r for r in rows}  # a retried batch cannot count a row twice
    if len(by_row) != unit.selected:
        raise RuntimeError(f"unit {unit.name}: {len(by_row)} rows back, {unit.selected} expected")
    good = sorted((r for r in by_row.values() if not r.get("reason")), key=lambda r: r["image_id"])
    bad = [r for r in by_row.values() if r.get("reason")]
    files: list[dict[str, Any]] = [
        {"path": mask_rel(r["image_id"]), "rows": None, "bytes": int(r["mask_bytes"])} for r in good
    ]
    if good:
        index = [
            {
                schema.IMAGE_ID: r["image_id"],
                schema.MASK: mask_rel(r["image_id"]),
                schema.HEIGHT: r["height"],
                schema.WIDTH: r["width"],
                schema.LABELS: r["labels"],
                schema.CHECKPOINT_SHA256: checkpoint_sha256,
                schema.SPLIT: r.get("split"),
            }
            for r in good
        ]
        table = pa.Table.from_pylist(index, schema=PSEUDO_MASK_SCHEMA)
        files.append(asdict(write_parquet(output_loc, shard_rel(unit.name), table)))
    quarantine = Quarantine(output_loc)
    for r in bad:
        quarantine.add(str(r.get("image_id")), f"{unit.path}#rg{unit.row_group}", r["reason"])
    entry = quarantine.flush(unit.name)
    if entry is not None:
        files.append(asdict(entry))
    k = spec.num_classes
    confusion: dict[str, dict[str, Any]] = {}
    for r in good:
        if "pseudo_masks" not in r:
            continue
        split = r.get("split") or NO_SPLIT
        acc = confusion.setdefault(
            split,
            {
                "images": 0,
                "pseudo_masks": np.zeros((k, k + 1), np.int64),
                spec.baseline: np.zeros((k, k + 1), np.int64),
            },
        )
        acc["images"] += 1
        add_sparse(acc["pseudo_masks"], r["pseudo_masks"])
        add_sparse(acc[spec.baseline], r["baseline"])
    record = {
        **{key: value for key, value in asdict(unit).items() if key != "name"},
        "unit": unit.name,
        "output": len(good),
        "quarantined": len(bad),
        "files": files,
        "images": [[r["image_id"], int(r["row"])] for r in good],
        "reasons": dict(Counter(reason_kind(r["reason"]) for r in bad)),
        "confusion": {
            split: {
                key: (value if key == "images" else to_sparse(value)) for key, value in acc.items()
            }
            for split, acc in confusion.items()
        },
        "infer_s": sum(r.get("infer_s", 0.0) for r in good),
        "crf_s": sum(r.get("crf_s", 0.0) for r in good),
    }
    write_bytes_atomic(output_loc, record_rel(unit.name), json.dumps(record).encode())
    return record


def build_metrics(
    records: Iterable[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    class_space: str,
    baseline: str,
    bg_threshold: float,
) -> dict[str, Any] | None:
    """Manifest metrics from the units' confusion counts; None when no row has GT.

    `pseudo_masks` and the baseline (`cam_argmax` for an ingest input, `seeds` for a refine
    input) are scored on the same images: every processed row with ground truth.
    """
    keys = ("pseudo_masks", baseline)
    totals = sum_by_split(records, keys, len(class_names), add_sparse)
    if not totals:
        return None
    return metrics_by_split(
        totals,
        keys,
        class_names,
        class_space=class_space,
        ground_truth="every processed row with ground truth (per split under by_split)",
        headline="pseudo_masks",
        extra={"cam_argmax_bg_threshold": bg_threshold} if baseline == "cam_argmax" else None,
    )
