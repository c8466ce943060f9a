"""Ingest stage: raw WSSS inputs in object storage → canonical Parquet shards + quarantine.

Reads the MCTformer/WeakTr layout (`JPEGImages/<id>.jpg`, `cams/<id>.npy`, `cls_labels.npy`,
optional `SegmentationClassAug/<id>.png`, optional split lists and `classes.txt`) or the CLIP-ES
CAM layout, from a local directory or `s3://`.

How the work is cut: the driver enumerates image ids (from split lists when given, so millions of
keys are never listed; else one listing per folder), rejects what it can see from names alone
(unsafe ids, duplicates, ids without a label), then cuts the sorted ids into fixed chunks. Ray
Data runs one task per chunk: it fetches the chunk's files concurrently, validates every row
(`pipelines.ingest.rows`) and writes `shards/part-<chunk>.parquet` and, for bad rows,
`quarantine/part-<chunk>.parquet`, then a small completion record `_chunks/part-<chunk>.json`.
File names depend only on the chunk, so a resumed run redoes only chunks without a record and
no row can appear twice. The driver commits `manifest.json` and `_SUCCESS` last.

Writes the ingest columns of `pipelines.io.schema.INGEST_COLUMNS`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.ingest.chunks import chunk_entries, ingest_chunk, read_records, reason_kind
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.listing import enumerate_inputs
from pipelines.io import schema
from pipelines.io.manifest import FileEntry, InputRef, Quarantine, StageOutput, StageState
from pipelines.io.storage import StorageOptions, resolve


@dataclass(frozen=True)
class IngestResult:
    """What a run did; `ok` is False when the quarantined share exceeded the limit."""

    output_uri: str
    counts: dict[str, int]
    reasons: dict[str, int]
    ok: bool
    message: str


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
    """Runs the ingest stage on the current Ray instance (see the module docstring).

    Args:
        input_uri: dataset root (MCTformer/WeakTr or CLIP-ES layout).
        output_uri: the stage's output directory.
        config: stage options.
        storage: endpoint/region of the object store (credentials come from the AWS chain).
        num_cpus_per_task: CPUs reserved per chunk task (fractional on small machines).
        overwrite: replace an output made with another config or input.
        report: progress sink, one line per call.

    Returns:
        The counts; `ok` False (and no `_SUCCESS`) when too many rows were quarantined.
    """
    import ray

    input_loc = resolve(input_uri, storage)
    output_loc = resolve(output_uri, storage)
    started = time.monotonic()
    found = enumerate_inputs(input_loc, config)
    report(
        f"ingest: {len(found.entries)} candidate rows, {len(found.rejects)} refused by name "
        f"({input_loc.uri}); class space {found.space.name} ({found.space.num_classes} classes)"
    )
    for note in found.notes:
        report(f"ingest: note: {note}")
    stage_config = asdict(config) | {"input_listing_sha256": found.digest}
    out = StageOutput.open(
        output_loc,
        stage="ingest",
        config=stage_config,
        inputs=[InputRef(uri=input_loc.uri)],
        overwrite=overwrite,
    )
    if out.state is StageState.DONE:
        report(out.done_message())
        assert out.manifest is not None
        counts = dict(out.manifest.counts)
        return IngestResult(output_loc.uri, counts, {}, True, out.done_message())

    chunks = chunk_entries(found.entries, config.rows_per_shard)
    records = read_records(output_loc, range(len(chunks))) if out.state is StageState.RESUME else {}
    records = {c: r for c, r in records.items() if isinstance(r, dict)}
    if records:  # a record whose files vanished, changed or were cut short is redone
        listed = [f["path"] for r in records.values() for f in r["files"]]
        sizes = out.existing(listed, check_parquet=False)
        records = {
            c: r
            for c, r in records.items()
            if r.get("input_rows") == len(chunks[c])
            and all(sizes.get(f["path"]) == f["bytes"] for f in r["files"])
        }
    todo = [i for i in range(len(chunks)) if i not in records]
    if records:
        report(f"ingest: resuming: {len(records)} of {len(chunks)} chunks already written")
    if todo:
        items = [{"chunk": i, "entries": json.dumps([asdict(e) for e in chunks[i]])} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ingest_chunk,
            batch_size=1,
            num_cpus=num_cpus_per_task,
            fn_kwargs={
                "input_loc": input_loc,
                "output_loc": output_loc,
                "config": config,
                "class_names": list(found.space.class_names),
                "space_name": found.space.name,
            },
        )
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            records[int(row["chunk"])] = record
            report(
                f"ingest: chunk {len(records)}/{len(chunks)}: {record['output']} rows, "
                f"{record['quarantined']} quarantined ({time.monotonic() - started:.0f} s)"
            )

    files = [FileEntry(**f) for i in sorted(records) for f in records[i]["files"]]
    quarantine = Quarantine(output_loc)
    for r in found.rejects:
        quarantine.add(r[schema.IMAGE_ID], r[schema.SOURCE], r[schema.REASON])
    driver_entry = quarantine.flush("part-driver")
    if driver_entry is not None:
        files.append(driver_entry)
    reasons: Counter[str] = Counter(reason_kind(r[schema.REASON]) for r in found.rejects)
    for record in records.values():
        reasons.update(record["reasons"])
    good = sum(r["output"] for r in records.values())
    bad = sum(r["quarantined"] for r in records.values()) + len(found.rejects)
    counts = {"input": len(found.entries) + len(found.rejects), "output": good, "quarantined": bad}
    assert counts["input"] == good + bad, counts
    fraction = bad / counts["input"] if counts["input"] else 0.0
    summary = ", ".join(f"{k}: {v}" for k, v in reasons.most_common(5))
    if counts["input"] == 0 or fraction > config.max_error_fraction:
        message = (
            f"{bad} of {counts['input']} rows quarantined ({fraction:.1%} > "
            f"max_error_fraction {config.max_error_fraction:.1%}): {summary or 'no input rows'}; "
            f"see {output_loc.child('quarantine').uri} (outputs kept, no _SUCCESS written)"
            if counts["input"]
            else f"no input rows found in {input_loc.uri}"
        )
        report(f"ingest: FAILED: {message}")
        return IngestResult(output_loc.uri, counts, dict(reasons), False, message)
    out.commit(
        files=files,
        counts=counts,
        class_names=found.space.class_names,
        class_space=found.space.name,
        extra={"quarantine_reasons": dict(reasons)},
    )
    message = (
        f"ingest: {good} rows in {sum(1 for f in files if f.path.startswith('shards/'))} shards, "
        f"{bad} quarantined{(' (' + summary + ')') if summary else ''}; "
        f"{output_loc.uri} ({time.monotonic() - started:.0f} s)"
    )
    report(message)
    return IngestResult(output_loc.uri, counts, dict(reasons), True, message)
