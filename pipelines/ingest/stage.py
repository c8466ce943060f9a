"""Ingest stage: raw WSSS inputs in object storage → canonical Parquet shards + quarantine.

Reads the MCTformer/WeakTr layout (`JPEGImages/<id>.jpg`, `cams/<id>.npy`, `cls_labels.npy`,
optional `SegmentationClassAug/<id>.png`, split lists and `classes.txt`) or the CLIP-ES CAM
layout, local or `s3://`. The driver enumerates image ids (`pipelines.ingest.listing`) and cuts
them into chunks (units) of `rows_per_unit` (by default sized for ~96 MiB shards from the first
rows; row groups of `rows_per_group`), each run as part tasks (`pipelines.parts`); the
rest is docs/ARCHITECTURE.md "The unit of work". Writes `schema.INGEST_COLUMNS`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

from pipelines import units as work
from pipelines.ingest.chunks import (
    chunk_entries,
    chunk_record_rel,
    finish_chunk,
    ingest_part,
    record_matches,
    sample_row_bytes,
)
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.listing import Enumeration, enumerate_inputs
from pipelines.io import schema
from pipelines.io.manifest import InputRef, Quarantine, StageOutput, StageState
from pipelines.io.storage import StorageOptions, resolve
from pipelines.parts import run_parts
from pipelines.progress import Progress


@dataclass(frozen=True)
class IngestResult(work.StageResult):
    """`StageResult` with the quarantine reasons."""

    reasons: dict[str, int] = field(default_factory=dict)


def run_ingest(
    input_uri: str,
    output_uri: str,
    config: IngestConfig,
    *,
    storage: StorageOptions | None = None,
    num_cpus_per_task: float = 0.5,
    overwrite: bool = False,
    report: Any = print,
) -> IngestResult:
    """Runs the ingest stage on the current Ray instance: a dataset root at `input_uri` →
    `output_uri`; `overwrite` replaces an output made with another config or input. `ok` is
    False (and no `_SUCCESS`) when too many rows were quarantined."""
    input_loc, output_loc = resolve(input_uri, storage), resolve(output_uri, storage)
    started = time.monotonic()
    found = enumerate_inputs(input_loc, config)
    report(
        f"ingest: {len(found.entries)} candidate rows, {len(found.rejects)} refused by name "
        f"({input_loc.uri}); class space {found.space.name} ({found.space.num_classes} classes)"
    )
    for note in found.notes:
        report(f"ingest: note: {note}")
    rows_per_unit = config.unit_rows
    if rows_per_unit is None:
        row_bytes = sample_row_bytes(
            found.entries, input_loc=input_loc, config=config, space=found.space
        )
        rows_per_unit = work.rows_per_unit_for(row_bytes or 0.0)
        sized = f"~{row_bytes / 1e3:.0f} KB per row" if row_bytes else "no sample row"
        report(f"ingest: {rows_per_unit} rows per unit ({sized}; --rows-per-unit sets it)")
    # what the run writes depends on the resolved value, not on how it was given
    config = replace(config, rows_per_unit=rows_per_unit, rows_per_shard=None)
    out = StageOutput.open(
        output_loc,
        stage="ingest",
        config=asdict(config) | {"input_listing_sha256": found.digest},
        inputs=[InputRef(uri=input_loc.uri)],
        overwrite=overwrite,
    )
    if out.state is StageState.DONE:
        return IngestResult(**work.already_done(out, report))
    chunks = chunk_entries(found.entries, rows_per_unit)
    records = work.resume(out, dict(enumerate(chunks)), record_matches, rel=chunk_record_rel)
    if records:
        report(f"ingest: resuming: {len(records)} of {len(chunks)} chunks already written")
    todo = [
        {"chunk": i, "rows": len(chunk), "entries": [asdict(e) for e in chunk]}
        for i, chunk in enumerate(chunks)
        if i not in records
    ]
    total = sum(t["rows"] for t in todo)
    progress = Progress("ingest", total, report=report)
    done = {"rows": 0, "chunks": 0, "quarantined": 0}

    def status() -> str:
        return f"{done['chunks']}/{len(todo)} chunks, {done['quarantined']} quarantined"

    def part_done(rows: int) -> None:
        done["rows"] += rows
        if done["rows"] < total:  # the last line comes once every chunk is written
            progress.update(done["rows"], status())

    space = dict(class_names=list(found.space.class_names), space_name=found.space.name)
    tasks = run_parts(
        todo,
        ingest_part,
        finish_chunk,
        num_cpus=num_cpus_per_task,
        part_kwargs=dict(input_loc=input_loc, config=config, **space),
        finish_kwargs=dict(output_loc=output_loc, config=config),
        on_part=part_done,
    )
    for record in tasks:
        records[int(record["chunk"])] = record
        done["chunks"] += 1
        done["quarantined"] += record["quarantined"]
    if todo:
        progress.update(done["rows"], status())
    ordered = [records[i] for i in sorted(records)]
    return _gate_and_commit(out, found, ordered, config, input_loc.uri, report, started)


def _gate_and_commit(
    out: StageOutput,
    found: Enumeration,
    records: Sequence[Mapping[str, Any]],
    config: IngestConfig,
    input_uri: str,
    report: Callable[[str], Any],
    started: float,
) -> IngestResult:
    """Sums the chunks' records and the rows refused by name (their quarantine file
    `quarantine/part-driver.parquet` listed after the chunks' files); `units.gate_and_commit`."""
    output_loc, rejects = out.location, found.rejects
    tally = work.tally_records(records)
    quarantine = Quarantine(output_loc)
    for r in rejects:
        quarantine.add(r[schema.IMAGE_ID], r[schema.SOURCE], r[schema.REASON])
    quarantine.flush("part-driver")
    tally.files += quarantine.files
    kinds = Counter(work.reason_kind(r[schema.REASON], drop_parenthesis=True) for r in rejects)
    tally.reasons = kinds + tally.reasons  # the rows refused by name first
    tally.quarantined += len(rejects)
    counts = {"input": len(found.entries) + len(rejects)}
    if counts["input"] == 0:
        message = f"no input rows found in {input_uri}"
        report(f"ingest: FAILED: {message}")
        return IngestResult(
            output_loc.uri, counts | {"output": 0, "quarantined": 0}, None, False, message
        )
    shards = sum(1 for f in tally.files if f.path.startswith("shards/"))
    return work.gate_and_commit(
        "ingest",
        out,
        tally,
        counts,
        max_error_fraction=config.max_error_fraction,
        started=started,
        result=partial(IngestResult, reasons=dict(tally.reasons)),
        summary=(f"{tally.output} rows in {shards} shards", ""),
        report=report,
        class_names=found.space.class_names,
        class_space=found.space.name,
    )
