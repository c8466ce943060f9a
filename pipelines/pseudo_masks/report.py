"""The visual report of a pseudo-mask output: image | CAM argmax | seed | pseudo mask | GT.

Image, GT and (refine input) seed come from the input rows, the mask from `masks/<id>.png`, the
CAM argmax from the ingest output (the input, or the `inputs[0]` of a refine input; its panel
is left out when it cannot be found). Only the sampled rows' row groups are read whole.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pipelines.io import schema
from pipelines.io.codecs import decode_label_map, decode_rgb
from pipelines.io.manifest import Manifest, read_manifest
from pipelines.io.parquet import read_row_group, read_shards
from pipelines.io.storage import Location, read_bytes, redact, resolve
from pipelines.pseudo_masks.rows import mask_rel, read_columns
from pipelines.pseudo_masks.rows import row_cam_argmax as _cam_argmax
from pipelines.report.strips import ReportRow
from pipelines.units import map_shards, unit_source


def _ingest_cams(
    ingest: Manifest, paths: Mapping[str, str], *, bg_threshold: float
) -> dict[str, np.ndarray]:
    """CAM argmax label maps from an ingest output of the ids of `paths` (image id → the refine
    shard its row is in). An id is looked for in the ingest row group its refine unit was made
    from (`units.unit_source`); only the ids not found there are looked up in every shard's id
    column (read in parallel). At most one row group per id is read whole."""
    loc, listed = ingest.location, {e.path for e in ingest.entries("shards/")}
    groups: dict[tuple[str, int], set[str]] = defaultdict(set)
    for image_id, path in paths.items():
        if (source := unit_source(path)) is not None and source[0] in listed:
            groups[source].add(image_id)
    found = _cams_in(loc, groups, bg_threshold)
    missing = set(paths) - set(found)
    if missing:
        shards = sorted(listed)
        groups = defaultdict(set)
        for path, shard in zip(shards, read_shards(loc, shards, [schema.IMAGE_ID]), strict=True):
            for group, table in enumerate(shard.groups):
                if hit := missing.intersection(table.column(0).to_pylist()):
                    groups[(path, group)] |= hit
        found |= _cams_in(loc, groups, bg_threshold)
    return found


def _cams_in(
    loc: Location, groups: Mapping[tuple[str, int], set[str]], bg_threshold: float
) -> dict[str, np.ndarray]:
    """CAM argmax of the wanted ids of each (ingest shard, row group), the groups read in
    parallel."""
    columns = [schema.IMAGE_ID, schema.HEIGHT, schema.WIDTH, schema.CAM, schema.CAM_CLASSES]

    def read(key: tuple[str, int]) -> dict[str, np.ndarray]:
        rows = read_row_group(loc, key[0], key[1], columns).to_pylist()
        wanted = groups[key]
        return {
            r[schema.IMAGE_ID]: _cam_argmax(r, bg_threshold)
            for r in rows
            if r[schema.IMAGE_ID] in wanted
        }

    found: dict[str, np.ndarray] = {}
    for part in map_shards(read, list(groups)):
        found |= part
    return found


def build_report_rows(
    sample: Mapping[str, tuple[str, int, int]],
    *,
    input_loc: Location,
    source: Manifest,
    output_loc: Location,
    bg_threshold: float,
    report: Callable[[str], Any] = print,
) -> list[ReportRow]:
    """`ReportRow`s of the `sample` (image id → (input shard, row group, row index in it)),
    masks from `output_loc`; `report` says when the CAM source is missing."""
    by_group: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)
    for image_id, (path, group, row) in sample.items():
        by_group[(path, group)].append((image_id, row))
    columns = read_columns(source.stage)
    inputs: dict[str, dict] = {}
    for (path, group), wanted in by_group.items():
        rows = read_row_group(input_loc, path, group, columns).to_pylist()
        for image_id, index in wanted:
            if rows[index][schema.IMAGE_ID] != image_id:
                raise RuntimeError(f"{path} row group {group} changed under the stage")
            inputs[image_id] = rows[index]
    cams: dict[str, np.ndarray] = {}
    if source.stage == "ingest":
        cams = {image_id: _cam_argmax(row, bg_threshold) for image_id, row in inputs.items()}
    elif source.inputs:
        try:
            ingest = read_manifest(resolve(source.inputs[0].uri, input_loc.options))
            if ingest.stage != "ingest":
                raise ValueError(f"inputs[0] is a {ingest.stage!r} output")
            paths = {image_id: sample[image_id][0] for image_id in inputs}
            cams = _ingest_cams(ingest, paths, bg_threshold=bg_threshold)
        except (OSError, ValueError, RuntimeError) as exc:
            report(f"pseudo_masks: report without CAM panels: {redact(str(exc))}")
    rows = []
    for image_id in sorted(inputs):
        row = inputs[image_id]
        height, width = row[schema.HEIGHT], row[schema.WIDTH]
        rows.append(
            ReportRow(
                image_id=image_id,
                image=decode_rgb(row[schema.IMAGE], height=height, width=width),
                cam=cams.get(image_id),
                seed=decode_label_map(row[schema.SEED]) if row.get(schema.SEED) else None,
                mask=decode_label_map(read_bytes(output_loc, mask_rel(image_id))),
                gt=decode_label_map(row[schema.GT]) if row.get(schema.GT) else None,
            )
        )
    return rows
