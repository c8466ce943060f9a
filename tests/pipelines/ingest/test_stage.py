"""The ingest stage on Ray Data: synthetic datasets with planted bad rows, local and on S3."""

from __future__ import annotations

import json
import os
import posixpath

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.ingest import IngestConfig, run_ingest
from pipelines.io import schema
from pipelines.io.codecs import decode_cam_column
from pipelines.io.manifest import StageConflictError, read_manifest
from pipelines.io.storage import resolve
from pipelines.metrics import ConfusionAccumulator
from pipelines.refine import RefineConfig, run_refine
from pipelines.seeds import cam_argmax
from pipelines.synthetic.dataset import plant_bad_inputs, write_dataset
from pipelines.units import rows_per_unit_for

pytestmark = pytest.mark.usefixtures("ray_session")

SPLITS = ("train.txt", "val.txt")


def _dataset(
    uri: str,
    *,
    num_images: int = 10,
    bad: bool = True,
    sentinel: str | None = None,
    layout: str = "mctformer",
    size: tuple[int, int] = (96, 128),
) -> tuple[set[str], dict[str, str]]:
    loc = resolve(uri)
    written = write_dataset(
        loc.fs,
        loc.path,
        num_images=num_images,
        seed=3,
        height=size[0],
        width=size[1],
        workers=1,
        layout=layout,  # type: ignore[arg-type]
    )
    planted = (
        plant_bad_inputs(loc.fs, loc.path, sentinel_path=sentinel, layout=layout)  # type: ignore[arg-type]
        if bad
        else {}
    )
    return set(written.train_ids) | set(written.val_ids), planted


def _rows(out_uri: str) -> list[dict]:
    manifest = read_manifest(out_uri)
    rows: list[dict] = []
    loc = manifest.location
    for path in manifest.file_paths("shards/"):
        with loc.fs.open(path, "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    return rows


def _quarantine(out_uri: str) -> dict[str, str]:
    manifest = read_manifest(out_uri)
    reasons: dict[str, str] = {}
    for path in manifest.file_paths("quarantine/"):
        with manifest.location.fs.open(path, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                reasons.setdefault(row[schema.IMAGE_ID], row[schema.REASON])
    return reasons


def _check_rows(rows: list[dict], good_ids: set[str], planted: dict[str, str]) -> None:
    ids = [r[schema.IMAGE_ID] for r in rows]
    assert len(ids) == len(set(ids)), "a row appears twice"
    # the duplicate-id row's first copy is a valid sample: it is kept once
    assert set(ids) == good_ids | ({"bad_duplicate_id"} if "bad_duplicate_id" in planted else set())
    for row in rows:
        cams = decode_cam_column(
            row[schema.CAM], len(row[schema.CAM_CLASSES]), row[schema.HEIGHT], row[schema.WIDTH]
        )
        assert cams.shape[0] == len(row[schema.LABELS]) and 0 <= cams.min() <= cams.max() <= 1
        assert row[schema.SPLIT] in ("train", "val")
        assert row[schema.GT] is not None


def test_ingest_local_quarantines_every_planted_bad_row(tmp_path) -> None:
    sentinel = tmp_path / "malicious-pickle-ran"
    good, planted = _dataset(str(tmp_path / "data"), sentinel=str(sentinel))
    out = str(tmp_path / "ingest")
    config = IngestConfig(splits=SPLITS, max_error_fraction=1.0)
    result = run_ingest(str(tmp_path / "data"), out, config, report=lambda _: None)
    assert result.ok
    _check_rows(_rows(out), good, planted)
    reasons = _quarantine(out)
    assert set(reasons) == set(planted)
    for image_id, keyword in planted.items():
        assert keyword.lower() in reasons[image_id].lower(), (image_id, reasons[image_id])
    assert not sentinel.exists(), "the malicious pickle ran"
    manifest = read_manifest(out)
    assert manifest.counts["input"] == manifest.counts["output"] + manifest.counts["quarantined"]
    assert manifest.counts["quarantined"] == len(planted)
    assert manifest.class_names[0] == "background" and manifest.class_space == "custom"

    # same config and inputs again: nothing to do, nothing rewritten
    before = os.path.getmtime(tmp_path / "ingest" / "manifest.json")
    again = run_ingest(str(tmp_path / "data"), out, config, report=lambda _: None)
    assert again.ok and os.path.getmtime(tmp_path / "ingest" / "manifest.json") == before
    # another config into the same output is refused
    with pytest.raises(StageConflictError):
        run_ingest(
            str(tmp_path / "data"),
            out,
            IngestConfig(splits=SPLITS, max_error_fraction=0.5),
            report=lambda _: None,
        )


def test_error_fraction_fails_without_success(tmp_path) -> None:
    _dataset(str(tmp_path / "data"))
    out = tmp_path / "ingest"
    result = run_ingest(
        str(tmp_path / "data"), str(out), IngestConfig(splits=SPLITS), report=lambda _: None
    )
    assert not result.ok and "max_error_fraction" in result.message
    assert not (out / "_SUCCESS").exists()
    assert list((out / "quarantine").glob("*.parquet")), "quarantine kept for inspection"


def test_resume_redoes_only_unfinished_chunks(tmp_path) -> None:
    good, _ = _dataset(str(tmp_path / "data"), num_images=12, bad=False)
    out = tmp_path / "ingest"
    config = IngestConfig(rows_per_shard=4)
    run_ingest(str(tmp_path / "data"), str(out), config, report=lambda _: None)
    first = sorted(r[schema.IMAGE_ID] for r in _rows(str(out)))
    # simulate an interruption: no _SUCCESS/manifest, one chunk unfinished with a torn file
    (out / "_SUCCESS").unlink()
    (out / "manifest.json").unlink()
    (out / "_chunks" / "part-00001.json").unlink()
    (out / "shards" / "part-00001.parquet").write_bytes(b"PAR1 torn")
    lines: list[str] = []
    result = run_ingest(str(tmp_path / "data"), str(out), config, report=lines.append)
    assert result.ok
    assert any("resuming: 2 of 3 chunks" in line for line in lines)
    rows = _rows(str(out))
    assert sorted(r[schema.IMAGE_ID] for r in rows) == first == sorted(good)


def test_rows_per_unit_cuts_shards_rows_per_group_their_row_groups(tmp_path) -> None:
    good, planted = _dataset(str(tmp_path / "data"))
    out = tmp_path / "ingest"
    config = IngestConfig(splits=SPLITS, max_error_fraction=1.0, rows_per_unit=8, rows_per_group=3)
    assert run_ingest(str(tmp_path / "data"), str(out), config, report=lambda _: None).ok
    shards = sorted((out / "shards").glob("*.parquet"))
    assert len(shards) == len(list((out / "_chunks").glob("*.json"))) > 2
    row_groups = []
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata
        rows = meta.num_rows  # 8 candidate rows a shard, less what was quarantined
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert rows <= 8 and sizes == [3] * (rows // 3) + ([rows % 3] if rows % 3 else [])
        row_groups += [(shard.name, i, n) for i, n in enumerate(sizes)]
    # refine gathers whole row groups of at most its rows_per_unit into a unit
    refined = tmp_path / "refine"
    result = run_refine(
        str(out), str(refined), RefineConfig(rows_per_unit=6), report=lambda _: None
    )
    assert result.ok and result.counts["output"] == len(_rows(str(out))) == len(good) + 1
    records = [json.loads(p.read_text()) for p in sorted((refined / "_units").glob("*.json"))]
    pieces = [tuple(p) for r in records for p in r["pieces"]]
    assert [(posixpath.basename(p), g, n) for p, g, n in pieces] == row_groups
    assert all(0 < r["input_rows"] <= 6 for r in records) and len(records) < len(row_groups)
    # the old name still works, and means the same
    assert (
        IngestConfig(rows_per_shard=32).unit_rows == 32 == IngestConfig(rows_per_unit=32).unit_rows
    )
    with pytest.raises(ValueError, match="old name"):
        IngestConfig(rows_per_shard=32, rows_per_unit=33)
    with pytest.raises(ValueError, match="rows_per_unit"):
        IngestConfig(rows_per_unit=0)
    with pytest.raises(ValueError, match="rows_per_group"):
        IngestConfig(rows_per_group=0)


def test_the_default_unit_is_sized_from_the_first_rows(tmp_path) -> None:
    _dataset(str(tmp_path / "data"), num_images=12, bad=False)
    lines: list[str] = []
    out = tmp_path / "ingest"
    assert run_ingest(str(tmp_path / "data"), str(out), IngestConfig(), report=lines.append).ok
    (line,) = [x for x in lines if "rows per unit" in x]
    shards = list((out / "shards").glob("*.parquet"))
    row_bytes = sum(p.stat().st_size for p in shards) / 12
    expected = rows_per_unit_for(row_bytes)
    assert abs(int(line.split("ingest: ")[1].split()[0]) - expected) <= 0.3 * expected
    assert len(shards) == 1  # small rows: one unit
    config = read_manifest(resolve(str(out))).config
    assert config["rows_per_unit"] == int(line.split("ingest: ")[1].split()[0])
    assert config["rows_per_shard"] is None
    # given explicitly as what the default came to, it is the same run: nothing to do
    again = IngestConfig(rows_per_unit=config["rows_per_unit"])
    assert run_ingest(str(tmp_path / "data"), str(out), again, report=lambda _: None).skipped


def test_listing_mode_and_clip_es_layout(tmp_path) -> None:
    good, _ = _dataset(str(tmp_path / "data"), num_images=6, bad=False, layout="clip-es")
    out = str(tmp_path / "ingest")
    result = run_ingest(
        str(tmp_path / "data"), out, IngestConfig(layout="clip-es"), report=lambda _: None
    )
    assert result.ok
    rows = _rows(out)
    assert {r[schema.IMAGE_ID] for r in rows} == good
    assert all(r[schema.SPLIT] is None for r in rows)


def test_changed_input_is_refused(tmp_path) -> None:
    _dataset(str(tmp_path / "data"), num_images=4, bad=False)
    out = str(tmp_path / "ingest")
    run_ingest(str(tmp_path / "data"), out, IngestConfig(), report=lambda _: None)
    extra = tmp_path / "data" / "JPEGImages" / "img_new.jpg"
    extra.write_bytes((tmp_path / "data" / "JPEGImages").glob("*.jpg").__next__().read_bytes())
    with pytest.raises(StageConflictError):
        run_ingest(str(tmp_path / "data"), out, IngestConfig(), report=lambda _: None)


@pytest.mark.slow
def test_ingest_s3_to_s3(s3_bucket: str, tmp_path) -> None:
    sentinel = tmp_path / "malicious-pickle-ran"
    data, out = f"{s3_bucket}/data", f"{s3_bucket}/runs/ingest"
    good, planted = _dataset(data, sentinel=str(sentinel))
    result = run_ingest(
        data, out, IngestConfig(splits=SPLITS, max_error_fraction=1.0), report=lambda _: None
    )
    assert result.ok
    _check_rows(_rows(out), good, planted)
    reasons = _quarantine(out)
    assert set(reasons) == set(planted)
    for image_id, keyword in planted.items():
        assert keyword.lower() in reasons[image_id].lower()
    assert not sentinel.exists()
    loc = resolve(out)
    assert loc.fs.exists(loc.join("_SUCCESS"))
    manifest = json.loads(loc.fs.cat_file(loc.join("manifest.json")))
    assert "weakclip-test-secret-key" not in json.dumps(manifest)


def test_cam_argmax_miou_in_band(tmp_path) -> None:
    """The synthetic CAMs are realistic: their argmax at threshold 0.4 scores 40–60% mIoU."""
    # VOC-like size: at 1/16 resolution a tiny image would leave the CAM a few pixels wide
    good, _ = _dataset(str(tmp_path / "data"), num_images=24, bad=False, size=(320, 448))
    out = str(tmp_path / "ingest")
    run_ingest(str(tmp_path / "data"), out, IngestConfig(), report=lambda _: None)
    rows = _rows(out)
    acc = ConfusionAccumulator(len(read_manifest(out).class_names))
    import io

    from PIL import Image

    for row in rows:
        cams = decode_cam_column(
            row[schema.CAM], len(row[schema.CAM_CLASSES]), row[schema.HEIGHT], row[schema.WIDTH]
        )
        pred = cam_argmax(cams, row[schema.CAM_CLASSES], bg_threshold=0.4)
        acc.add(pred, np.asarray(Image.open(io.BytesIO(row[schema.GT]))))
    miou = acc.score().miou
    print(f"synthetic CAM-argmax mIoU at threshold 0.4 over {len(rows)} images: {miou:.3f}")
    assert 0.40 <= miou <= 0.60
