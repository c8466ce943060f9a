"""Reading the Parquet shards of a stage output: footers, one row group, columns of many files.

Files are opened with the location's fsspec filesystem (`Location.fs`: s3fs with botocore's
retries, or the local disk), so a storage failure raises what s3fs or the OS raises, and a
corrupt file `pyarrow.ArrowInvalid` (a ValueError). A requested column a file lacks is left out
of its tables: a reader asks for optional columns (`split`, `gt`, ...) like any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io.storage import Location

_THREADS = 16  # files read at once by `read_shards` (storage round trips overlap)


@dataclass(frozen=True)
class Shard:
    """What `read_shard` found in one file."""

    names: tuple[str, ...]  # the file's columns
    rows: tuple[int, ...]  # the row count of each row group
    missing: tuple[str, ...] = ()  # the `required` columns it lacks (then no data was read)
    groups: tuple[pa.Table, ...] = ()  # per row group, the requested columns the file has
    column_bytes: Mapping[str, int] = field(default_factory=dict)  # compressed, all row groups


@contextlib.contextmanager
def _open(location: Location, path: str) -> Iterator[pq.ParquetFile]:
    with location.fs.open(location.join(path), "rb") as handle:
        yield pq.ParquetFile(handle)


def _present(parquet: pq.ParquetFile, columns: Sequence[str]) -> list[str]:
    names = set(parquet.schema_arrow.names)
    return [c for c in columns if c in names]


def read_row_group(
    location: Location, path: str, row_group: int, columns: Sequence[str]
) -> pa.Table:
    """The `columns` (those the file has, in the order given) of one row group of `path`.

    Raises:
        OSError: the file cannot be read (FileNotFoundError: it does not exist).
        pyarrow.ArrowInvalid: not a Parquet file, or no such row group.
    """
    with _open(location, path) as parquet:
        return parquet.read_row_group(row_group, columns=_present(parquet, columns))


def read_shard(
    location: Location, path: str, columns: Sequence[str] = (), *, required: Sequence[str] = ()
) -> Shard:
    """The footer of `path` and, unless a `required` column is missing, `columns` of each
    row group (the footer only when `columns` is empty). Raises as `read_row_group`."""
    with _open(location, path) as parquet:
        names = tuple(parquet.schema_arrow.names)
        meta = parquet.metadata
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        sizes: dict[str, int] = {}
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + column.total_compressed_size
        missing = tuple(c for c in required if c not in names)
        if missing or not columns:
            return Shard(names, rows, missing, column_bytes=sizes)
        present = _present(parquet, columns)
        groups = tuple(parquet.read_row_group(i, columns=present) for i in range(len(rows)))
        return Shard(names, rows, missing, groups, sizes)


def read_shards(location: Location, paths: Sequence[str], columns: Sequence[str]) -> list[Shard]:
    """`read_shard` of every path, several files at once, in the order of `paths`."""
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(paths)))) as pool:
        return list(pool.map(lambda path: read_shard(location, path, columns), paths))
