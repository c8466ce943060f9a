"""`pipelines.units`: unit names, completion records and resumption, the tally and the error
gate with the commit, and the per-split metrics of `pipelines.metrics` the stages build on them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines import units as u
from pipelines.io.manifest import FileEntry, InputRef, StageOutput, StageState, read_manifest
from pipelines.io.storage import resolve, write_bytes_atomic
from pipelines.metrics import NO_SPLIT, finite, sum_by_split, summed_metrics

INPUTS = [InputRef("s3://bucket/ingest", "ab" * 32)]


def _open(tmp_path: Path) -> StageOutput:
    return StageOutput.open(resolve(str(tmp_path)), stage="refine", config={}, inputs=INPUTS)


def _record(name: str, files: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"unit": name, "files": files, "output": 1, "quarantined": 0, "reasons": {}, **extra}


def test_names_follow_the_shard_and_row_group() -> None:
    assert u.unit_name("shards/part-00003.parquet", 7) == "part-00003-rg0007"
    assert u.unit_name("a/b/odd", 12) == "odd-rg0012"
    assert u.shard_rel("x-rg0001") == "shards/x-rg0001.parquet"
    assert u.record_rel("x-rg0001") == "_units/x-rg0001.json"
    assert u.record_rel("part-00001", "_chunks") == "_chunks/part-00001.json"


def test_unit_names_must_be_unique_and_safe() -> None:
    u.check_unit_names(["a-rg0000", "a-rg0001"])
    with pytest.raises(ValueError, match="share file names"):
        u.check_unit_names(["a-rg0000", "a-rg0000"])
    with pytest.raises(ValueError):
        u.check_unit_names(["../escape"])


def test_map_shards_keeps_the_order() -> None:
    assert u.map_shards(str.upper, ["a", "b", "c"]) == ["A", "B", "C"]
    assert u.map_shards(str.upper, []) == []


def test_resume_keeps_only_matching_records_with_intact_files(tmp_path: Path) -> None:
    out = _open(tmp_path)
    loc = out.location
    assert out.state is StageState.FRESH
    assert u.resume(out, {"a": 1}, lambda unit, record: True) == {}  # nothing to resume
    for name in ("a", "b", "c", "d"):
        write_bytes_atomic(loc, f"shards/{name}.parquet", b"12345")
    sized = [{"path": "shards/{}.parquet", "rows": 1, "bytes": 5}]

    def files(name: str, size: int = 5) -> list[dict[str, Any]]:
        return [dict(sized[0], path=f"shards/{name}.parquet", bytes=size)]

    write_bytes_atomic(loc, u.record_rel("a"), json.dumps(_record("a", files("a"))).encode())
    write_bytes_atomic(loc, u.record_rel("b"), json.dumps(_record("b", files("b", 9))).encode())
    write_bytes_atomic(loc, u.record_rel("c"), b'{"unit": "c", "fi')  # torn
    write_bytes_atomic(loc, u.record_rel("d"), json.dumps(_record("other", files("d"))).encode())
    units = {"a": "a", "b": "b", "c": "c", "d": "d", "e": "e"}
    matches = lambda unit, record: record.get("unit") == unit  # noqa: E731
    found = u.read_records(loc, units, matches, u.record_rel)
    assert sorted(found) == ["a", "b"]
    assert sorted(u.keep_intact(out, found)) == ["a"]  # b's shard has another size
    resumed = _open(tmp_path)
    assert resumed.state is StageState.RESUME
    assert sorted(u.resume(resumed, units, matches)) == ["a"]


def test_records_with_integer_keys_use_the_given_path(tmp_path: Path) -> None:
    out = _open(tmp_path)
    write_bytes_atomic(out.location, "_chunks/part-00001.json", json.dumps({"n": 3}).encode())
    found = u.read_records(
        out.location,
        {0: 3, 1: 3},
        lambda rows, record: record["n"] == rows,
        lambda chunk: u.record_rel(f"part-{chunk:05d}", "_chunks"),
    )
    assert found == {1: {"n": 3}}


def test_tally_sums_records_in_order() -> None:
    tally = u.tally_records(
        [
            {"output": 2, "quarantined": 1, "reasons": {"x": 1}, "files": [_file("p1")]},
            {"output": 0, "quarantined": 3, "reasons": {"x": 1, "y": 2}, "files": [_file("p2")]},
        ]
    )
    assert (tally.output, tally.quarantined) == (2, 4)
    assert tally.reasons == {"x": 2, "y": 2}
    assert [f.path for f in tally.files] == ["p1", "p2"]
    assert all(isinstance(f, FileEntry) for f in tally.files)
    assert tally.summary() == "x: 2, y: 2"
    assert tally.summary_suffix() == " (x: 2, y: 2)"
    assert u.Tally().summary_suffix() == ""


def _file(path: str) -> dict[str, Any]:
    return {"path": path, "rows": 1, "bytes": 10}


def test_gate_and_commit_fails_above_the_fraction_else_commits(tmp_path: Path) -> None:
    lines: list[str] = []
    out = _open(tmp_path)
    tally = u.Tally(output=98, quarantined=2)
    tally.reasons.update({"bad": 2})

    def gate(fraction: float, counts: dict[str, int], **more: Any) -> u.StageResult:
        return u.gate_and_commit(
            "refine",
            out,
            tally,
            counts,
            max_error_fraction=fraction,
            started=time.monotonic(),
            result=u.StageResult,
            summary=("98 rows", "; more"),
            report=lines.append,
            class_names=["background", "cat"],
            class_space="custom",
            units=3,
            **more,
        )

    with pytest.raises(RuntimeError, match="row counts do not add up"):
        gate(0.02, {"input": 101})
    failed = gate(0.01, {"input": 100})
    assert not failed.ok and failed.counts == {"input": 100, "output": 98, "quarantined": 2}
    assert failed.message.startswith(
        "2 of 100 rows quarantined (2.0% > max_error_fraction 1.0%): bad: 2"
    )
    assert failed.message.endswith("(outputs kept, no _SUCCESS written)")
    assert lines == [f"refine: FAILED: {failed.message}"]
    assert not (tmp_path / "_SUCCESS").exists()
    lines.clear()
    metrics = {"gt_images": 4, "seeds": {"miou": 0.5}}
    passed = gate(0.02, {"input": 100}, metrics=metrics, scores={"seeds": "seed"})
    assert passed.ok and lines == [passed.message]
    assert passed.message.startswith(
        "refine: 98 rows, 2 quarantined (bad: 2); more; mIoU (custom, 4 images with GT): "
        f"seed 50.0; {out.location.uri} ("
    )
    manifest = read_manifest(out.location)
    assert manifest.counts == {"input": 100, "output": 98, "quarantined": 2}
    assert manifest.extra == {"quarantine_reasons": {"bad": 2}, "units": 3}


def test_reason_kind_and_pct() -> None:
    assert u.reason_kind("undecodable CAM: truncated") == "undecodable CAM"
    assert u.reason_kind("duplicate image id (an earlier row has it)") == (
        "duplicate image id (an earlier row has it)"
    )
    assert u.reason_kind("CAM file too large (9 bytes > 1)", drop_parenthesis=True) == (
        "CAM file too large"
    )
    assert u.pct(0.4567) == "45.7"
    assert u.pct(None) == "n/a"
    assert u.pct(float("nan")) == "n/a"


def test_metrics_by_split_sums_and_scores() -> None:
    perfect = [[1, 0, 0], [0, 1, 0]]
    wrong = [[0, 1, 0], [1, 0, 0]]
    records = [
        {"confusion": {"train": {"images": 1, "a": perfect, "b": wrong}}},
        {"confusion": {NO_SPLIT: {"images": 2, "a": perfect, "b": perfect}}},
    ]

    def add(matrix: np.ndarray, counts: Any) -> None:
        matrix += np.asarray(counts, dtype=np.int64)

    totals = sum_by_split(records, ("a", "b"), 2, add)
    assert sorted(totals) == [NO_SPLIT, "train"]
    metrics = summed_metrics(
        records,
        ("a", "b"),
        ["background", "cat"],
        add,
        class_space="custom",
        ground_truth="all",
        headline="a",
        extra={"threshold": 0.5},
    )
    assert metrics["gt_images"] == 3 and metrics["threshold"] == 0.5
    assert metrics["miou"] == metrics["a"]["miou"] == 1.0
    assert metrics["by_split"]["train"] == {
        "images": 1,
        "a": 1.0,
        "b": 0.0,
        "per_class_iou": {
            "a": {"background": 1.0, "cat": 1.0},
            "b": {"background": 0.0, "cat": 0.0},
        },
    }
    assert metrics["b"]["miou"] == pytest.approx(1 / 3)
    assert finite(float("nan")) is None and finite(0.5) == 0.5


def test_unit_source_reads_back_a_unit_name() -> None:
    name = u.unit_name("shards/part-00003.parquet", 7)
    assert u.unit_source(u.shard_rel(name)) == ("shards/part-00003.parquet", 7)
    assert u.unit_source("shards/a-rg-x-rg0012.parquet") == ("shards/a-rg-x.parquet", 12)
    for other in ("shards/part-00003.parquet", "shards/x-rg12.parquet", "shards/-rg0001.parquet"):
        assert u.unit_source(other) is None
