"""The Parquet access layer: footers, row groups, optional and required columns, many files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import parquet
from pipelines.io.storage import resolve


def _write(directory: Path, name: str, table: pa.Table, row_group_size: int = 2) -> str:
    pq.write_table(table, directory / name, row_group_size=row_group_size)
    return name


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    ids = [f"img{i}" for i in range(5)]
    return [
        _write(tmp_path, "a.parquet", pa.table({"image_id": ids, "height": list(range(5))})),
        _write(tmp_path, "b.parquet", pa.table({"image_id": ["x"], "split": ["val"]})),
    ]


def test_row_group_reads_present_columns_in_the_order_given(tmp_path: Path, shards: list[str]):
    table = parquet.read_row_group(
        resolve(str(tmp_path)), "a.parquet", 1, ["height", "split", "image_id"]
    )
    assert table.column_names == ["height", "image_id"]
    assert table.to_pydict() == {"height": [2, 3], "image_id": ["img2", "img3"]}


def test_shard_footer_groups_and_required_columns(tmp_path: Path, shards: list[str]):
    loc = resolve(str(tmp_path))
    footer = parquet.read_shard(loc, "a.parquet")
    assert footer.names == ("image_id", "height") and footer.rows == (2, 2, 1)
    assert footer.groups == () and footer.missing == ()
    shard = parquet.read_shard(loc, "a.parquet", ["image_id", "split"], required=["image_id"])
    assert [t.to_pydict() for t in shard.groups] == [
        {"image_id": ["img0", "img1"]},
        {"image_id": ["img2", "img3"]},
        {"image_id": ["img4"]},
    ]
    refused = parquet.read_shard(loc, "a.parquet", ["image_id"], required=["split", "gt", "height"])
    assert refused.missing == ("split", "gt") and refused.groups == ()


def test_many_shards_keep_the_order_of_paths(tmp_path: Path, shards: list[str]):
    loc = resolve(str(tmp_path))
    found = parquet.read_shards(loc, list(reversed(shards)), ["image_id"])
    assert [s.rows for s in found] == [(1,), (2, 2, 1)]
    assert found[0].groups[0].to_pydict() == {"image_id": ["x"]}


def test_missing_and_corrupt_files_raise_what_storage_and_pyarrow_raise(tmp_path: Path):
    loc = resolve(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        parquet.read_shard(loc, "absent.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(pa.ArrowInvalid):
        parquet.read_row_group(loc, "bad.parquet", 0, ["image_id"])
    _write(tmp_path, "one.parquet", pa.table({"image_id": ["a"]}))
    with pytest.raises(pa.ArrowInvalid):
        parquet.read_row_group(loc, "one.parquet", 3, ["image_id"])
