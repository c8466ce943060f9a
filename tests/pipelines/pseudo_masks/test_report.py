"""The report's CAM lookup in the ingest output behind a refine input."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.io import schema
from pipelines.pseudo_masks import report
from pipelines.pseudo_masks.rows import row_cam_argmax
from tests.pipelines.pseudo_masks.inputs import ingest_rows, write_shard_output


def test_a_cam_is_read_from_the_row_group_its_refine_unit_came_from(tmp_path, monkeypatch):
    rows = ingest_rows(5)  # one shard, row groups [0, 1, 2] and [3, 4]
    ingest = write_shard_output(str(tmp_path / "ingest"), rows, stage="ingest")
    wanted = rows[3][schema.IMAGE_ID]
    read = []
    real_read = report.read_row_group

    def counted(loc, path, group, columns):
        read.append((path, group))
        return real_read(loc, path, group, columns)

    monkeypatch.setattr(report, "read_row_group", counted)
    monkeypatch.setattr(report, "read_shards", lambda *a: pytest.fail("every shard scanned"))
    found = report._ingest_cams(
        ingest, {wanted: "shards/part-00000-rg0001.parquet"}, bg_threshold=0.43
    )
    assert read == [("shards/part-00000.parquet", 1)]
    np.testing.assert_array_equal(found[wanted], row_cam_argmax(rows[3], 0.43))


def test_an_id_not_where_its_unit_name_says_is_still_found(tmp_path):
    rows = ingest_rows(5)
    ingest = write_shard_output(str(tmp_path / "ingest"), rows, stage="ingest")
    paths = {
        rows[0][schema.IMAGE_ID]: "shards/part-00000-rg0001.parquet",  # it is in group 0
        rows[4][schema.IMAGE_ID]: "shards/some-other-name.parquet",
    }
    found = report._ingest_cams(ingest, paths, bg_threshold=0.43)
    assert set(found) == set(paths)
    np.testing.assert_array_equal(found[rows[4][schema.IMAGE_ID]], row_cam_argmax(rows[4], 0.43))
