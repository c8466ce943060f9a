"""The pseudo-mask stage on Ray: outputs, quarantine, restriction, resume and refusals."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.io import manifest as mf
from pipelines.io import schema
from pipelines.io.codecs import voc_palette
from pipelines.io.storage import resolve
from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks
from pipelines.pseudo_masks.report import build_report_rows
from tests.pipelines.pseudo_masks.inputs import (
    CLASS_NAMES,
    HEIGHT,
    WIDTH,
    ingest_rows,
    make_checkpoint,
    refine_rows_from,
    write_shard_output,
)


def check_output(out_dir: str, expected_ids: set[str], labels: dict[str, list[int]]) -> mf.Manifest:
    """The manifest agrees with the files; one palette mask per expected image, right classes."""
    manifest = mf.read_manifest(resolve(out_dir))
    assert manifest.stage == "pseudo_masks"
    listed = {f.path: f.bytes for f in manifest.files}
    on_disk = {}
    for top in ("masks", "shards", "quarantine", "report"):
        for root, _, names in os.walk(os.path.join(out_dir, top)):
            for name in names:
                path = os.path.join(root, name)
                on_disk[os.path.relpath(path, out_dir)] = os.path.getsize(path)
    assert on_disk == listed  # every data file listed with its size, nothing else
    masks = {p[len("masks/") : -len(".png")] for p in listed if p.startswith("masks/")}
    assert masks == expected_ids
    assert manifest.counts["output"] == len(expected_ids)
    for image_id in expected_ids:
        with Image.open(os.path.join(out_dir, "masks", f"{image_id}.png")) as png:
            assert png.mode == "P" and png.size == (WIDTH, HEIGHT)
            assert png.getpalette()[: 3 * 256] == voc_palette()
            values = set(np.unique(np.array(png)).tolist())
        assert values <= {0, *labels[image_id]}, (image_id, values, labels[image_id])
    index = pq.read_table(
        [os.path.join(out_dir, p) for p in listed if p.startswith("shards/")]
    ).to_pylist()
    assert sorted(r[schema.IMAGE_ID] for r in index) == sorted(expected_ids)
    assert all(r[schema.MASK] == f"masks/{r[schema.IMAGE_ID]}.png" for r in index)
    assert {r[schema.CHECKPOINT_SHA256] for r in index} == {manifest.config["checkpoint_sha256"]}
    return manifest


@pytest.mark.slow
def test_ingest_input_quarantine_resume_and_checkpoint_change(tmp_path, ray_session) -> None:
    rows = ingest_rows(8, val=2)
    bad = [
        {**rows[0], schema.IMAGE_ID: "bad_labels", schema.LABELS: [1, 42]},
        {**rows[1], schema.IMAGE_ID: "bad_image", schema.IMAGE: b"\xff\xd8 broken jpeg"},
        {**rows[2], schema.IMAGE_ID: "../escape"},
        dict(rows[3]),  # the same id again
    ]
    # Units (row groups of 2): syn 0-1, 2-3, 4-5 | 6-7 (val: nothing selected) | 4 bad rows.
    write_shard_output(str(tmp_path / "ingest"), rows + bad, stage="ingest", rows_per_group=2)
    checkpoint = make_checkpoint(str(tmp_path / "a" / "model.pt"))
    train = {r[schema.IMAGE_ID] for r in rows if r[schema.SPLIT] == "train"}
    labels = {r[schema.IMAGE_ID]: r[schema.LABELS] for r in rows}
    config = PseudoMaskConfig(max_error_fraction=0.5, report_images=3)
    out_dir = str(tmp_path / "out")
    lines: list[str] = []

    def run(**kwargs):
        return run_pseudo_masks(
            str(tmp_path / "ingest"), out_dir, checkpoint, config, report=lines.append, **kwargs
        )

    result = run()
    assert result.ok, result.message
    assert result.counts == {
        "input": 12,
        "selected": 10,
        "skipped": 2,
        "output": 6,
        "quarantined": 4,
    }
    manifest = check_output(out_dir, train, labels)
    assert (
        manifest.config["checkpoint_sha256"]
        == hashlib.sha256(open(checkpoint, "rb").read()).hexdigest()
    )
    assert manifest.extra["checkpoint"]["sha256"] == manifest.config["checkpoint_sha256"]
    quarantined = pq.read_table(
        [os.path.join(out_dir, p) for p in manifest.file_paths("quarantine/")]
    ).to_pylist()
    reasons = {r[schema.IMAGE_ID]: r[schema.REASON] for r in quarantined}
    assert "outside [1, 7)" in reasons["bad_labels"]
    assert "undecodable image" in reasons["bad_image"]
    assert "unsafe image id" in reasons["../escape"]
    assert "duplicate image id" in reasons[rows[3][schema.IMAGE_ID]]
    metrics = manifest.metrics
    assert metrics["gt_images"] == 6 and metrics["by_split"]["train"]["images"] == 6
    assert 0 <= metrics["pseudo_masks"]["miou"] <= 1 and 0 <= metrics["cam_argmax"]["miou"] <= 1
    assert metrics["miou"] == metrics["pseudo_masks"]["miou"]  # the headline: the masks' score
    assert len(manifest.extra["report"]) == 4  # 3 strips + index.html
    assert result.actor_memory_mb and all(v > 0 for v in result.actor_memory_mb.values())

    # Interrupted: a mask of unit rg0000, the index shard of rg0001, manifest and _SUCCESS gone.
    kept = os.path.join(out_dir, "masks", "syn_000004.png")  # unit rg0002
    kept_mtime = os.stat(kept).st_mtime_ns
    for rel in ("masks/syn_000000.png", "shards/part-00000-rg0001.parquet"):
        os.remove(os.path.join(out_dir, rel))
    for rel in ("_SUCCESS", "manifest.json"):
        os.remove(os.path.join(out_dir, rel))
    lines.clear()
    result = run()
    assert result.ok and any("resuming: 4 of 6 units already done" in ln for ln in lines), lines
    assert result.images_run == 4  # units rg0000 and rg0001 again
    check_output(out_dir, train, labels)
    assert os.stat(kept).st_mtime_ns == kept_mtime  # a finished unit is not redone

    lines.clear()
    assert run().skipped and "nothing to do" in lines[-1]

    other = make_checkpoint(str(tmp_path / "b" / "model.pt"), seed=1)
    with pytest.raises(mf.StageConflictError, match="checkpoint_sha256"):
        run_pseudo_masks(str(tmp_path / "ingest"), out_dir, other, config, report=lines.append)
    replaced = run_pseudo_masks(
        str(tmp_path / "ingest"), out_dir, other, config, overwrite=True, report=lines.append
    )
    assert replaced.ok
    manifest = check_output(out_dir, train, labels)
    assert (
        manifest.config["checkpoint_sha256"] == hashlib.sha256(open(other, "rb").read()).hexdigest()
    )


def test_refine_input_all_splits_unrestricted(tmp_path, ray_session) -> None:
    rows = ingest_rows(5, val=2)
    ingest = write_shard_output(str(tmp_path / "ingest"), rows, stage="ingest")
    write_shard_output(
        str(tmp_path / "refine"),
        refine_rows_from(rows),
        stage="refine",
        rows_per_group=5,
        inputs=[ingest.input_ref()],
    )
    checkpoint = make_checkpoint(str(tmp_path / "model.pt"))
    config = PseudoMaskConfig(
        splits=None, restrict_to_image_classes=False, use_crf=False, report_images=2
    )
    out_dir = str(tmp_path / "out")
    result = run_pseudo_masks(
        str(tmp_path / "refine"), out_dir, checkpoint, config, report=lambda _: None
    )
    assert result.ok and result.counts["output"] == 5 and result.counts["skipped"] == 0
    manifest = check_output(
        out_dir,
        {r[schema.IMAGE_ID] for r in rows},
        {r[schema.IMAGE_ID]: list(range(1, len(CLASS_NAMES))) for r in rows},
    )
    assert manifest.config["inference"]["restrict_to_image_classes"] is False
    assert manifest.config["inference"]["crf"] is None
    assert (
        set(manifest.metrics) >= {"seeds", "pseudo_masks"} and "cam_argmax" not in manifest.metrics
    )
    splits = pq.read_table(manifest.file_paths("shards/")).column(schema.SPLIT).to_pylist()
    assert sorted(splits) == ["train"] * 3 + ["val"] * 2
    # The report finds the CAM through the refine manifest's inputs[0] (the ingest output).
    source = mf.read_manifest(resolve(str(tmp_path / "refine")))
    report_rows = build_report_rows(
        {rows[0][schema.IMAGE_ID]: ("shards/part-00000.parquet", 0, 0)},
        input_loc=source.location,
        source=source,
        output_loc=resolve(out_dir),
        bg_threshold=0.43,
    )
    (row,) = report_rows
    assert row.cam is not None and row.seed is not None and row.gt is not None
    assert row.mask.shape == row.image.shape[:2] == (HEIGHT, WIDTH)


def test_class_space_mismatch_is_refused_before_ray(tmp_path, monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: pytest.fail("Ray work started"))
    write_shard_output(str(tmp_path / "ingest"), ingest_rows(2), stage="ingest")
    names = ("background", "disc", "square", "triangle", "ring", "cross", "oval")
    checkpoint = make_checkpoint(str(tmp_path / "model.pt"), class_names=names)
    with pytest.raises(ValueError, match="class id 6 \\('oval' vs 'ellipse'\\)"):
        run_pseudo_masks(
            str(tmp_path / "ingest"), str(tmp_path / "out"), checkpoint, PseudoMaskConfig()
        )
    assert not os.path.exists(tmp_path / "out")


def test_a_failed_unit_write_raises_as_soon_as_it_is_seen() -> None:
    from concurrent.futures import ThreadPoolExecutor, wait

    from pipelines.pseudo_masks.stage import _collect_finished

    def store_down() -> dict:
        raise ConnectionError("the store is gone (retries spent)")

    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = [pool.submit(lambda: {"unit": "a"}), pool.submit(store_down)]
        wait(writes)
        records: dict = {}
        with pytest.raises(ConnectionError):
            _collect_finished(writes, records)
        assert records == {"a": {"unit": "a"}}  # the good write is kept
