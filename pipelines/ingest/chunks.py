"""An ingest chunk (the unit: one shard and one record) as part tasks over ranges of its rows
(`ingest_part`: fetch the files, validate every row) and a task that writes it
(`finish_chunk`: the shard `shards/part-<chunk>.parquet`, its quarantine and last its record
`_chunks/part-<chunk>.json`); `pipelines.parts`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.listing import Entry, unpack_label
from pipelines.ingest.rows import SHARD_SCHEMA, RowLimits, build_row
from pipelines.io.class_spaces import ClassSpace
from pipelines.io.rows import RowRejected
from pipelines.io.storage import Location, open_atomic, read_many
from pipelines.units import record_rel, shard_rel, write_unit

_FETCH_GROUP = 16  # rows whose files are fetched concurrently
SAMPLE_ROWS = 16  # rows the default rows per unit is sized from
CHUNK_DIR = "_chunks"  # completion records of finished chunks (bookkeeping, not data files)


def chunk_name(index: int) -> str:
    return f"part-{index:05d}"


def process_chunk(
    unit: Mapping[str, Any],
    *,
    input_loc: Location,
    output_loc: Location,
    config: IngestConfig,
    class_names: Sequence[str],
    space_name: str,
) -> dict[str, Any]:
    """Ingests one chunk in this process (`ingest_part` of all its rows, `finish_chunk`)."""
    part = ingest_part(
        unit,
        0,
        len(unit["entries"]),
        input_loc=input_loc,
        config=config,
        class_names=class_names,
        space_name=space_name,
    )
    return finish_chunk(unit, part, output_loc=output_loc, config=config)


def ingest_part(
    unit: Mapping[str, Any],
    start: int,
    stop: int,
    *,
    input_loc: Location,
    config: IngestConfig,
    class_names: Sequence[str],
    space_name: str,
) -> dict[str, Any]:
    """Fetches and validates entries `[start, stop)` of a chunk (`{"chunk", "entries"}`; a
    `pipelines.parts` part task), `_FETCH_GROUP` rows' files at a time: `{"table"` (the good
    rows, SHARD_SCHEMA), `"rejected"` ([(image id, source, reason)]), `"input_rows"}`."""
    entries = [Entry(**e) for e in unit["entries"][start:stop]]
    space = ClassSpace(space_name, tuple(class_names))
    limits = RowLimits(max_pixels=config.max_pixels)
    good: list[dict[str, Any]] = []
    rejected: list[tuple[str, str, str]] = []
    for first in range(0, len(entries), _FETCH_GROUP):
        group = entries[first : first + _FETCH_GROUP]
        blobs = _fetch(input_loc, [p for e in group for p in (e.image, e.cam, e.gt)])
        images = _find_images(input_loc, group, blobs)
        for entry in group:
            try:
                good.append(_row(entry, images, blobs, config, space, limits))
            except RowRejected as exc:
                source = entry.cam or entry.image or entry.image_id
                rejected.append((entry.image_id, source, exc.reason))
    table = pa.Table.from_pylist(good, schema=SHARD_SCHEMA)
    return {"table": table, "rejected": rejected, "input_rows": len(entries)}


def finish_chunk(
    unit: Mapping[str, Any], *parts: Mapping[str, Any], output_loc: Location, config: IngestConfig
) -> dict[str, Any]:
    """Writes a chunk's shard `shards/part-<chunk>.parquet` (its parts' rows in order, row
    groups of `rows_per_group`; an all-bad chunk gets an empty shard), its quarantine and,
    last, its record `_chunks/part-<chunk>.json`, which it returns."""
    chunk = int(unit["chunk"])
    shard = shard_rel(chunk_name(chunk))
    table = pa.concat_tables([p["table"] for p in parts]).combine_chunks()
    with open_atomic(output_loc, shard) as writer_file:
        pq.write_table(table, writer_file, compression="zstd", row_group_size=config.rows_per_group)
    size = int(output_loc.fs.size(output_loc.join(*shard.split("/"))))
    return write_unit(
        output_loc,
        chunk_name(chunk),
        {
            "chunk": chunk,
            "input_rows": sum(p["input_rows"] for p in parts),
            "output": table.num_rows,
        },
        rejected=[r for p in parts for r in p["rejected"]],
        files=[{"path": shard, "rows": table.num_rows, "bytes": size}],
        record_dir=CHUNK_DIR,
        drop_parenthesis=True,
    )


def _row(
    entry: Entry,
    images: dict[str, bytes],
    blobs: dict[str, bytes | None],
    config: IngestConfig,
    space: ClassSpace,
    limits: RowLimits,
) -> dict[str, Any]:
    if entry.cam is None and entry.image is not None:
        raise RowRejected("missing CAM file")
    return build_row(
        image_id=entry.image_id,
        image=images.get(entry.image_id),
        cam=blobs.get(entry.cam) if entry.cam else None,
        label_vector=unpack_label(entry.label),
        gt=blobs.get(entry.gt) if entry.gt else None,
        source=entry.cam or entry.image or entry.image_id,
        split=entry.split,
        layout=config.layout,
        space=space,
        limits=limits,
    )


def _find_images(
    input_loc: Location, group: Sequence[Entry], blobs: dict[str, bytes | None]
) -> dict[str, bytes]:
    """{image id: image bytes}; ids whose image is missing get their alternates tried."""
    images = {e.image_id: blobs[e.image] for e in group if e.image and blobs.get(e.image)}
    retry = [e for e in group if e.image_id not in images and e.image_alternates]
    if retry:
        more = _fetch(input_loc, [p for e in retry for p in e.image_alternates])
        for entry in retry:
            found = next((more[p] for p in entry.image_alternates if more.get(p)), None)
            if found is not None:
                images[entry.image_id] = found
    return images


def _fetch(input_loc: Location, rel_paths: Sequence[str | None]) -> dict[str, bytes | None]:
    """Reads files concurrently (`read_many`); a missing file maps to None."""
    blobs: dict[str, bytes | None] = {}
    for rel, value in read_many(input_loc, [rel for rel in rel_paths if rel]).items():
        # A storage error that outlasts the retries was raised: it fails the task, not the row.
        blobs[rel] = value if isinstance(value, bytes) else None
    return blobs


def chunk_entries(entries: Sequence[Entry], rows_per_unit: int) -> list[list[Entry]]:
    """The entries in id order, cut into chunks (units) of `rows_per_unit`."""
    ordered = sorted(entries, key=lambda e: e.image_id)
    return [ordered[i : i + rows_per_unit] for i in range(0, len(ordered), rows_per_unit)]


def sample_row_bytes(
    entries: Sequence[Entry],
    *,
    input_loc: Location,
    config: IngestConfig,
    space: ClassSpace,
    rows: int = SAMPLE_ROWS,
) -> float | None:
    """Shard bytes per row of the first `rows` entries (in id order), fetched, validated and
    written as a chunk writes them (in memory); None when none of them makes a row."""
    sample = sorted(entries, key=lambda e: e.image_id)[:rows]
    if not sample:
        return None
    unit = {"entries": [asdict(e) for e in sample]}
    names = dict(class_names=list(space.class_names), space_name=space.name)
    part = ingest_part(unit, 0, len(sample), input_loc=input_loc, config=config, **names)
    table = part["table"]
    if table.num_rows == 0:
        return None
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=config.rows_per_group)
    return len(buffer.getvalue()) / table.num_rows


def chunk_record_rel(chunk: int) -> str:
    """`_chunks/part-<chunk>.json`: where the completion record of a chunk lives."""
    return record_rel(chunk_name(chunk), CHUNK_DIR)


def record_matches(entries: Sequence[Entry], record: Mapping[str, Any]) -> bool:
    """Whether a record found on disk is this chunk's (as many input rows)."""
    return record.get("input_rows") == len(entries)
