"""Helpers shared by the hostile-input cases: committed inputs, reading outputs, stderr lines."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest.rows import SHARD_SCHEMA
from pipelines.io.manifest import FileEntry, InputRef, StageOutput, read_manifest
from pipelines.io.storage import Location, write_bytes_atomic
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES


def read_rows(loc: Location, prefix: str) -> list[dict]:
    """Rows of the Parquet files a committed manifest lists under `prefix`."""
    manifest = read_manifest(loc)
    rows: list[dict] = []
    for path in manifest.file_paths(prefix):
        if path.endswith(".parquet"):
            with loc.fs.open(path, "rb") as f:
                rows.extend(pq.read_table(f).to_pylist())
    return rows


def read_parquet_file(loc: Location, rel: str) -> list[dict]:
    """Rows of one Parquet file below `loc`."""
    with loc.fs.open(loc.join(rel), "rb") as f:
        return pq.read_table(f).to_pylist()


def one_error_line(stderr: str) -> str:
    """The job's last stderr line, which must be its one-line `error: ...` message."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no error message on stderr"
    assert lines[-1].startswith("error: "), lines[-1]
    return lines[-1]


def write_ingest_output(
    loc: Location, shards: Sequence[Sequence[dict]], *, rows_per_group: int = 4
) -> None:
    """Rows as a committed ingest output, one shard per inner sequence."""
    out = StageOutput.open(loc, stage="ingest", config={}, inputs=[InputRef("hostile://corpus")])
    files = []
    total = 0
    for number, rows in enumerate(shards):
        buffer = io.BytesIO()
        table = pa.Table.from_pylist(list(rows), schema=SHARD_SCHEMA)
        pq.write_table(table, buffer, row_group_size=rows_per_group)
        rel = f"shards/part-{number:05d}.parquet"
        write_bytes_atomic(loc, rel, buffer.getvalue())
        files.append(FileEntry(rel, len(rows), len(buffer.getvalue())))
        total += len(rows)
    out.commit(
        files=files,
        counts={"input": total, "output": total, "quarantined": 0},
        class_names=SYNTHETIC_CLASSES.class_names,
        class_space="custom",
    )
