"""Stage outputs: run record, DONE/RESUME/FRESH, conflicts, commit checks, readers."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import manifest as mf
from pipelines.io import manifest_format as mff
from pipelines.io import storage
from pipelines.io.lease import LEASE, OutputBusyError
from pipelines.io.manifest import (
    FileEntry,
    InputRef,
    ManifestError,
    Quarantine,
    StageConflictError,
    StageOutput,
    StageState,
    read_manifest,
    write_parquet,
)
from pipelines.io.manifest_format import IncompleteOutputError
from pipelines.io.storage import Location, resolve

CONFIG = {"crf_iterations": 10, "scales": [1.0, 0.5]}
INPUTS = [InputRef("s3://bucket/ingest", "ab" * 32)]
TABLE = pa.table({"image_id": ["a", "b", "c"]})


def _open(loc: Location, **kw) -> StageOutput:
    kw.setdefault("config", CONFIG)
    kw.setdefault("inputs", INPUTS)
    return StageOutput.open(loc, stage="refine", **kw)


def _commit(out: StageOutput, files: list[FileEntry]) -> mf.Manifest:
    return out.commit(
        files=files,
        counts={"input": 3, "output": 3, "quarantined": 0},
        class_names=["background", "cat"],
        class_space="custom",
    )


def _run_to_completion(loc: Location) -> mf.Manifest:
    out = _open(loc)
    entry = write_parquet(loc, "shards/part-00000.parquet", TABLE)
    return _commit(out, [entry])


def test_fresh_run_commits_manifest_then_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    loc = resolve(str(tmp_path / "refine"))
    out = _open(loc)
    assert out.state is StageState.FRESH
    assert storage.exists(loc, mf.RUN_RECORD)
    entry = write_parquet(loc, "shards/part-00000.parquet", TABLE)
    assert entry == FileEntry("shards/part-00000.parquet", 3, entry.bytes)

    written: list[str] = []
    real_write = mf.write_bytes_atomic

    def recording_write(location: Location, rel: str, data: bytes) -> None:
        written.append(rel)
        real_write(location, rel, data)

    monkeypatch.setattr(mf, "write_bytes_atomic", recording_write)
    manifest = _commit(out, [entry])
    assert written == [mf.MANIFEST, mf.SUCCESS]
    assert (tmp_path / "refine" / mf.SUCCESS).read_bytes() == b""

    doc = json.loads((tmp_path / "refine" / mf.MANIFEST).read_text())
    assert doc["stage"] == "refine"
    assert doc["files"] == [{"path": entry.path, "rows": 3, "bytes": entry.bytes}]
    assert doc["counts"] == {"input": 3, "output": 3, "quarantined": 0}
    assert doc["config"] == CONFIG
    assert doc["inputs"] == [{"uri": "s3://bucket/ingest", "manifest_sha256": "ab" * 32}]
    assert doc["class_names"] == ["background", "cat"] and doc["class_space"] == "custom"
    assert doc["code_version"] and doc["created"].endswith("Z")

    again = read_manifest(loc)
    data = (tmp_path / "refine" / mf.MANIFEST).read_bytes()
    assert again.sha256 == manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert again.file_paths("shards/") == [str(tmp_path / "refine/shards/part-00000.parquet")]
    assert mf.read_manifest(loc.uri).sha256 == again.sha256
    assert again.input_ref() == InputRef(loc.uri, again.sha256)


def test_same_config_after_success_is_done(tmp_path: Path):
    loc = resolve(str(tmp_path))
    first = _run_to_completion(loc)
    out = _open(loc)
    assert out.state is StageState.DONE
    assert out.manifest is not None and out.manifest.sha256 == first.sha256
    assert "nothing to do" in out.done_message()
    with pytest.raises(RuntimeError, match="already complete"):
        _commit(out, [])


def test_interrupted_run_resumes_and_sees_finished_parts(tmp_path: Path):
    loc = resolve(str(tmp_path))
    _open(loc)
    write_parquet(loc, "shards/part-00000.parquet", TABLE)
    # a part cut off mid-write by a non-atomic writer
    (tmp_path / "shards" / "part-00001.parquet").write_bytes(b"PAR1\x00\x00truncated")
    out = _open(loc)
    assert out.state is StageState.RESUME
    expected = [f"shards/part-0000{i}.parquet" for i in range(3)]
    done = out.existing(expected)
    assert set(done) == {"shards/part-00000.parquet"}
    assert set(out.existing(expected, check_parquet=False)) == set(expected[:2])
    entries = [write_parquet(loc, rel, TABLE) for rel in expected[1:]]
    entries.insert(0, FileEntry(expected[0], 3, done[expected[0]]))
    assert [f.path for f in _commit(out, entries).files] == expected


def test_different_config_is_refused_with_a_clear_message(tmp_path: Path):
    loc = resolve(str(tmp_path))
    _run_to_completion(loc)
    with pytest.raises(StageConflictError, match="crf_iterations") as info:
        _open(loc, config={**CONFIG, "crf_iterations": 5})
    assert "--overwrite" in str(info.value)
    with pytest.raises(StageConflictError, match="inputs differ"):
        _open(loc, inputs=[InputRef("s3://bucket/ingest", "cd" * 32)])
    with pytest.raises(StageConflictError, match="stage"):
        StageOutput.open(loc, stage="train", config=CONFIG, inputs=INPUTS)
    assert storage.exists(loc, mf.SUCCESS)  # nothing was touched


def test_different_config_refused_while_incomplete_too(tmp_path: Path):
    loc = resolve(str(tmp_path))
    _open(loc)
    with pytest.raises(StageConflictError):
        _open(loc, config={"crf_iterations": 1})


def test_overwrite_deletes_old_outputs_and_starts_fresh(tmp_path: Path):
    loc = resolve(str(tmp_path / "out"))
    _run_to_completion(loc)
    write_parquet(loc, "shards/orphan.parquet", TABLE)
    out = _open(loc, config={"crf_iterations": 5}, overwrite=True)
    assert out.state is StageState.FRESH
    assert sorted(os.listdir(tmp_path / "out")) == [LEASE, mf.RUN_RECORD]  # the lease: `out`'s
    with pytest.raises(IncompleteOutputError):
        read_manifest(loc)


def test_upstream_rerun_invalidates_downstream(tmp_path: Path):
    upstream = resolve(str(tmp_path / "ingest"))
    down = resolve(str(tmp_path / "refine"))
    _run_to_completion(upstream)
    first = StageOutput.open(
        down, stage="refine", config=CONFIG, inputs=[read_manifest(upstream).input_ref()]
    )
    _commit(first, [])
    _open(upstream, overwrite=True)
    with pytest.raises(IncompleteOutputError):
        read_manifest(upstream)  # the upstream is being recomputed: nothing to build on
    _run_to_completion(upstream)
    with pytest.raises(StageConflictError, match="inputs differ"):
        StageOutput.open(
            down, stage="refine", config=CONFIG, inputs=[read_manifest(upstream).input_ref()]
        )


def test_foreign_directory_is_never_written_or_deleted(tmp_path: Path):
    (tmp_path / "my_images").mkdir()
    (tmp_path / "my_images" / "a.jpg").write_bytes(b"precious")
    loc = resolve(str(tmp_path / "my_images"))
    for overwrite in (False, True):
        with pytest.raises(StageConflictError, match="never written into or deleted"):
            _open(loc, overwrite=overwrite)
    assert os.listdir(tmp_path / "my_images") == ["a.jpg"]


def test_config_may_be_a_dataclass(tmp_path: Path):
    @dataclass(frozen=True)
    class Cfg:
        crf_iterations: int = 10
        scales: tuple[float, ...] = (1.0, 0.5)

    loc = resolve(str(tmp_path))
    StageOutput.open(loc, stage="refine", config=Cfg(), inputs=INPUTS)
    assert _open(loc).state is StageState.RESUME  # same fingerprint as the equal dict
    with pytest.raises(TypeError, match="JSON"):
        StageOutput.open(loc, stage="refine", config={"p": Path("/x")}, inputs=INPUTS)


# --- commit checks ---------------------------------------------------------------------------


def test_commit_refuses_missing_and_resized_files(tmp_path: Path):
    loc = resolve(str(tmp_path))
    out = _open(loc)
    entry = write_parquet(loc, "shards/part-00000.parquet", TABLE)
    with pytest.raises(ManifestError, match="missing"):
        _commit(out, [entry, FileEntry("shards/part-00001.parquet", 3, 10)])
    with pytest.raises(ManifestError, match="bytes on storage"):
        _commit(out, [FileEntry(entry.path, 3, entry.bytes + 1)])
    assert not storage.exists(loc, mf.MANIFEST) and not storage.exists(loc, mf.SUCCESS)


@pytest.mark.parametrize("path", ["../x.parquet", "/etc/passwd", "_SUCCESS", "manifest.json"])
def test_commit_refuses_unsafe_or_reserved_paths(tmp_path: Path, path: str):
    out = _open(resolve(str(tmp_path)))
    with pytest.raises(ManifestError):
        _commit(out, [FileEntry(path, None, 0)])


def test_commit_checks_fields(tmp_path: Path):
    out = _open(resolve(str(tmp_path)))
    with pytest.raises(ManifestError, match="counts"):
        out.commit(files=[], counts={"input": 1}, class_names=[], class_space="voc")
    with pytest.raises(ManifestError, match="class_space"):
        out.commit(
            files=[],
            counts=dict.fromkeys(mff.REQUIRED_COUNTS, 0),
            class_names=[],
            class_space="imagenet",
        )
    with pytest.raises(ManifestError, match="shadows"):
        out.commit(
            files=[],
            counts=dict.fromkeys(mff.REQUIRED_COUNTS, 0),
            class_names=[],
            class_space="voc",
            extra={"files": []},
        )


def test_commit_keeps_metrics_and_extra(tmp_path: Path):
    loc = resolve(str(tmp_path))
    out = _open(loc)
    out.commit(
        files=[],
        counts=dict.fromkeys(mff.REQUIRED_COUNTS, 0),
        class_names=["bg"],
        class_space="voc",
        metrics={"miou": 0.5},
        extra={"iterations": 7},
    )
    got = read_manifest(loc)
    assert got.metrics == {"miou": 0.5} and got.extra == {"iterations": 7}


def test_commit_refuses_after_takeover(tmp_path: Path):
    loc = resolve(str(tmp_path))
    out = _open(loc)
    _open(loc, config={"other": 1}, overwrite=True)
    with pytest.raises(OutputBusyError, match="taken over"):
        _commit(out, [])


# --- readers ---------------------------------------------------------------------------------


def _write_raw_manifest(tmp_path: Path, doc: dict | str) -> Location:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (tmp_path / mf.MANIFEST).write_text(text)
    (tmp_path / mf.SUCCESS).write_bytes(b"")
    return resolve(str(tmp_path))


def _valid_doc() -> dict:
    return {
        "stage": "ingest",
        "files": [{"path": "shards/part-0.parquet", "rows": 1, "bytes": 5}],
        "counts": {"input": 1, "output": 1, "quarantined": 0},
        "class_names": ["background"],
        "class_space": "voc",
        "config": {},
        "inputs": [],
        "code_version": "0.1.0",
        "created": "2026-01-01T00:00:00Z",
        "metrics": None,
    }


def test_reader_refuses_missing_success(tmp_path: Path):
    loc = resolve(str(tmp_path))
    (tmp_path / mf.MANIFEST).write_text(json.dumps(_valid_doc()))
    with pytest.raises(IncompleteOutputError, match="incomplete: no _SUCCESS"):
        read_manifest(loc)


@pytest.mark.parametrize(
    "bad_path", ["../outside.parquet", "/abs/file.parquet", "a/../../b", "shards//x", "_RUN.json"]
)
def test_reader_refuses_escaping_paths(tmp_path: Path, bad_path: str):
    doc = _valid_doc()
    doc["files"][0]["path"] = bad_path
    with pytest.raises(ManifestError):
        read_manifest(_write_raw_manifest(tmp_path, doc))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("counts"),
        lambda d: d.update(stage="bogus"),
        lambda d: d["files"][0].update(bytes=-1),
        lambda d: d["files"][0].update(rows=True),
        lambda d: d["files"].append(dict(d["files"][0])),
        lambda d: d.update(class_names=[1]),
        lambda d: d.update(inputs=[{"uri": 3}]),
    ],
)
def test_reader_validates_fields(tmp_path: Path, mutate):
    doc = _valid_doc()
    mutate(doc)
    with pytest.raises(ManifestError):
        read_manifest(_write_raw_manifest(tmp_path, doc))


def test_reader_refuses_non_json(tmp_path: Path):
    with pytest.raises(ManifestError, match="JSON"):
        read_manifest(_write_raw_manifest(tmp_path, "{not json"))
    with pytest.raises(ManifestError, match="object"):
        read_manifest(_write_raw_manifest(tmp_path, "[1, 2]"))


def test_wait_for_success(tmp_path: Path):
    loc = resolve(str(tmp_path / "out"))
    with pytest.raises(TimeoutError, match="no _SUCCESS"):
        mff.wait_for_success(loc, timeout_s=0.2, poll_s=0.05)
    _run_to_completion(loc)
    assert mff.wait_for_success(loc.uri, timeout_s=0).stage == "refine"


# --- quarantine ------------------------------------------------------------------------------


def test_quarantine_writes_one_line_redacted_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "qsecret-xyz")
    loc = resolve(str(tmp_path))
    out = _open(loc)
    q = Quarantine(loc)
    assert q.flush("part-00000") is None
    q.add("img1", "cams/img1.npy", "unsafe pickle:\n  global os.system qsecret-xyz")
    q.add("img2", "cams/img2.npy", "x" * 2000)
    entry = q.flush("part-00001")
    assert entry is not None and entry.path == "quarantine/part-00001.parquet"
    assert q.count == 2 and q.files == [entry]
    rows = pq.read_table(tmp_path / entry.path).to_pylist()
    assert [r["image_id"] for r in rows] == ["img1", "img2"]
    assert "\n" not in rows[0]["reason"] and "qsecret-xyz" not in rows[0]["reason"]
    assert len(rows[1]["reason"]) == mf.MAX_REASON_CHARS
    manifest = out.commit(
        files=q.files,
        counts={"input": 2, "output": 0, "quarantined": q.count},
        class_names=[],
        class_space="voc",
    )
    assert manifest.entries("quarantine/") == [entry]


# --- S3 --------------------------------------------------------------------------------------


def test_full_cycle_on_s3(s3_bucket: str):
    loc = resolve(s3_bucket).child("refine")
    assert _open(loc).state is StageState.FRESH
    write_parquet(loc, "shards/part-00000.parquet", TABLE)
    out = _open(loc)
    assert out.state is StageState.RESUME
    done = out.existing(["shards/part-00000.parquet", "shards/part-00001.parquet"])
    assert list(done) == ["shards/part-00000.parquet"]
    second = write_parquet(loc, "shards/part-00001.parquet", TABLE)
    with pytest.raises(ManifestError):
        _commit(out, [FileEntry("shards/part-00000.parquet", 3, 1), second])
    manifest = _commit(
        out, [FileEntry("shards/part-00000.parquet", 3, done["shards/part-00000.parquet"]), second]
    )
    assert _open(loc).state is StageState.DONE
    read = read_manifest(loc.uri)
    assert read.sha256 == manifest.sha256
    table = pq.read_table(read.file_paths("shards/"), filesystem=loc.pyarrow_fs())
    assert table.num_rows == 6
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in storage.read_bytes(loc, mf.MANIFEST).decode()
    with pytest.raises(StageConflictError):
        _open(loc, config={"x": 1})
    assert _open(loc, config={"x": 1}, overwrite=True).state is StageState.FRESH
    assert not storage.exists(loc, "shards/part-00000.parquet")


def test_code_version_without_a_git_checkout(monkeypatch: pytest.MonkeyPatch):
    import importlib.metadata

    real_exists = os.path.exists
    monkeypatch.setattr(
        mf.os.path, "exists", lambda p: False if p.endswith(".git") else real_exists(p)
    )
    assert mf.code_version.__wrapped__() == importlib.metadata.version("weakclip-pipeline")
