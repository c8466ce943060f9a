"""Units of the pseudo-mask stage: one row group of an input shard each (`enumerate_units`),
written once all its rows are back (`finish_unit`). A unit's record lists its masks too, so
that `pipelines.units.resume` redoes a unit whose mask changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipelines.io import schema
from pipelines.io.manifest import Manifest
from pipelines.io.parquet import read_shard
from pipelines.io.storage import Location
from pipelines.metrics import NO_SPLIT, add_sparse, sum_by_split, to_sparse
from pipelines.pseudo_masks.rows import PseudoUnit, RowSpec, in_splits, mask_rel
from pipelines.units import (
    check_unit_names,
    listed_shards,
    map_shards,
    unit_fields,
    unit_name,
    write_unit,
)

PSEUDO_MASK_SCHEMA = schema.arrow_schema(schema.PSEUDO_MASK_COLUMNS)
_REQUIRED = {
    "ingest": (schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.CAM),
    "refine": (schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.SEED),
}


def enumerate_units(
    input_loc: Location, manifest: Manifest, *, splits: tuple[str, ...] | None
) -> list[PseudoUnit]:
    """One unit per row group of every listed shard, with its rows in `splits` and repeated ids
    (later copies are quarantined rather than written over the first one's mask).

    Raises:
        ValueError: a shard lacks a required column, two shards share a file name, or no row
            is in `splits`.
    """
    shards = listed_shards(manifest)
    required = _REQUIRED[manifest.stage]

    def scan(path: str) -> list[tuple[int, list[Any], list[Any]]]:
        shard = read_shard(input_loc, path, [schema.IMAGE_ID, schema.SPLIT], required=required)
        if shard.missing:
            raise ValueError(
                f"{path} is not a {manifest.stage} shard: no column(s) {', '.join(shard.missing)}"
            )
        groups = []
        for group, table in enumerate(shard.groups):
            cols = table.to_pydict()
            ids = cols[schema.IMAGE_ID]
            groups.append((group, ids, cols.get(schema.SPLIT) or [None] * len(ids)))
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
    if sum(u.selected for u in units) == 0:
        raise ValueError(
            f"{input_loc.uri} holds no rows in split(s) {list(splits or [])} "
            f"({sum(u.rows for u in units)} rows in all)"
        )
    return units


def finish_unit(
    unit: PseudoUnit,
    rows: Sequence[Mapping[str, Any]],
    output_loc: Location,
    checkpoint_sha256: str,
    spec: RowSpec,
) -> dict[str, Any]:
    """Writes a complete unit's index shard, quarantine file and (last) its record, from the
    `meta` of each of its selected rows (one per row) as the last stage returned them.

    Returns:
        The record: the unit's fields, `output`, `quarantined`, `files` (masks first),
        `images` ([image id, row index] of written masks), `reasons`, `confusion` ({split:
        {"images", "pseudo_masks", <baseline>}} as sparse counts), `infer_s`, `crf_s`.
    """
    good = sorted((r for r in rows if not r.get("reason")), key=lambda r: r["image_id"])
    source = f"{unit.path}#rg{unit.row_group}"
    rejected = [(str(r.get("image_id")), source, r["reason"]) for r in rows if r.get("reason")]
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
    scored = [  # each scored row as a one-image record of `sum_by_split`
        {"confusion": {r.get("split") or NO_SPLIT: {"images": 1, **_counts(r, spec.baseline)}}}
        for r in good
        if "pseudo_masks" in r
    ]
    confusion = sum_by_split(scored, ("pseudo_masks", spec.baseline), spec.num_classes, add_sparse)
    record = {
        **unit_fields(unit),
        "output": len(good),
        "images": [[r["image_id"], int(r["row"])] for r in good],
        "confusion": {
            split: {k: v if k == "images" else to_sparse(v) for k, v in acc.items()}
            for split, acc in confusion.items()
        },
        "infer_s": sum(r.get("infer_s", 0.0) for r in good),
        "crf_s": sum(r.get("crf_s", 0.0) for r in good),
    }
    masks = [
        {"path": mask_rel(r["image_id"]), "rows": None, "bytes": int(r["mask_bytes"])} for r in good
    ]
    table = pa.Table.from_pylist(index, schema=PSEUDO_MASK_SCHEMA)
    return write_unit(output_loc, unit.name, record, table=table, rejected=rejected, files=masks)


def _counts(row: Mapping[str, Any], baseline: str) -> dict[str, Any]:
    """The sparse confusion counts of a row with GT, by key."""
    return {"pseudo_masks": row["pseudo_masks"], baseline: row["baseline"]}
