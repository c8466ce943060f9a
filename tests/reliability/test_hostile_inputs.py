"""Hostile inputs to ingest and refine: every defect is quarantined with its reason or fails the
job with a one-line error naming the problem; good rows come through exactly once, unchanged.

The corpus is `tests.reliability.hostile` plus `pipelines.synthetic.dataset.plant_bad_inputs`; jobs
run through their `main([...])` on the shared Ray session, as a user would run them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.ingest import main as ingest_main
from jobs.refine import main as refine_main
from pipelines.io import schema
from pipelines.io.manifest import read_manifest
from pipelines.io.storage import resolve
from pipelines.refine import RefineConfig
from pipelines.refine.rows import refine_row
from pipelines.synthetic.dataset import BAD_INPUTS, plant_bad_inputs, write_dataset
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES
from tests.reliability import hostile
from tests.reliability.hostile_tools import one_error_line, read_rows, write_ingest_output

pytestmark = pytest.mark.usefixtures("ray_session")

NUM_CLASSES = SYNTHETIC_CLASSES.num_classes


# ---------------------------------------------------------------------------------------------
# ingest


def test_ingest_quarantines_every_raw_defect(tmp_path: Path, capfd, reliability) -> None:
    reliability.case(
        kind="input",
        name="ingest: every kind of defective raw row",
        injected=(
            "a 6-image synthetic dataset plus one defective row per kind: "
            f"{len(BAD_INPUTS)} kinds of `synthetic.dataset.BAD_INPUTS` (truncated/non-npy/"
            "malicious pickle/non-finite/mis-shaped CAMs, unlabelled CAM class, empty or "
            "wrong-length label vector, missing/undecodable image, duplicate id, path-traversal "
            "id, decompression-bomb PNG) and "
            f"{len(hostile.MORE_BAD_INPUTS)} of `hostile.MORE_BAD_INPUTS` (zero-sized image, GT "
            "class ids outside the class space, CAM key outside the label vector, CAM values "
            "outside [0, 1], GT of another size); run `jobs.ingest` with --max-error-fraction 1"
        ),
        checked=(
            "exit 0; each bad row has a quarantine row whose reason names its defect; every good "
            "image id appears exactly once with its image bytes unchanged; the malicious "
            "pickle's sentinel file never appears"
        ),
    )
    sentinel = tmp_path / "pickle-ran"
    data = resolve(str(tmp_path / "data"))
    written = write_dataset(
        data.fs, data.path, num_images=6, seed=5, height=64, width=80, workers=1
    )
    planted = plant_bad_inputs(data.fs, data.path, sentinel_path=str(sentinel))
    planted.update(hostile.plant_more_bad_inputs(data.fs, data.path, height=64, width=80))
    out = resolve(str(tmp_path / "ingest"))
    argv = ["--input", data.uri, "--output", out.uri, "--split", "train.txt", "--split", "val.txt"]
    status = ingest_main([*argv, "--max-error-fraction", "1"])
    captured = capfd.readouterr()
    assert status == 0, captured.err
    reasons = {r[schema.IMAGE_ID]: r[schema.REASON] for r in read_rows(out, "quarantine/")}
    assert set(reasons) == set(planted)
    wrong = {i: reasons[i] for i, kw in planted.items() if kw.lower() not in reasons[i].lower()}
    assert not wrong, wrong
    rows = read_rows(out, "shards/")
    ids = [r[schema.IMAGE_ID] for r in rows]
    good = set(written.train_ids) | set(written.val_ids)
    assert sorted(ids) == sorted(good | {"bad_duplicate_id"})  # its first copy is valid
    for row in rows:
        if row[schema.IMAGE_ID] in good:
            source = data.fs.cat_file(data.join(f"JPEGImages/{row[schema.IMAGE_ID]}.jpg"))
            assert row[schema.IMAGE] == source
    assert not sentinel.exists(), "the malicious pickle ran"
    counts = read_manifest(out).counts
    reliability.observe(
        f"{counts['input']} rows in, {counts['output']} out, {counts['quarantined']} quarantined "
        f"({len(planted)} planted defects, {len(good)} good images)"
    )
    for image_id in ("bad_zero_sized_image", "bad_gt_class_range", "bad_cam_index_range"):
        reliability.observe(f"`{image_id}`: {reasons[image_id]}")


def test_ingest_refuses_a_malicious_label_file(tmp_path: Path, capfd, reliability) -> None:
    reliability.case(
        kind="input",
        name="ingest: cls_labels.npy is a malicious pickle",
        injected="`cls_labels.npy` replaced by an object .npy whose pickle runs `touch SENTINEL`",
        checked="exit 1 with one line naming cls_labels.npy; the sentinel never appears; "
        "no _SUCCESS",
    )
    sentinel = tmp_path / "pickle-ran"
    data = resolve(str(tmp_path / "data"))
    write_dataset(data.fs, data.path, num_images=3, seed=1, height=48, width=64, workers=1)
    data.fs.pipe_file(data.join("cls_labels.npy"), hostile.malicious_npy(str(sentinel)))
    out = resolve(str(tmp_path / "ingest"))
    status = ingest_main(["--input", data.uri, "--output", out.uri])
    line = one_error_line(capfd.readouterr().err)
    assert status == 1
    assert "cls_labels.npy" in line and "refused" in line.lower(), line
    assert not sentinel.exists(), "the malicious pickle ran"
    assert not out.fs.exists(out.join("_SUCCESS"))
    reliability.observe(f"stderr: {line}")


# ---------------------------------------------------------------------------------------------
# refine


def test_refine_quarantines_every_bad_row(tmp_path: Path, capfd, reliability) -> None:
    bad = hostile.bad_ingest_rows(num_classes=NUM_CLASSES)
    good = hostile.good_ingest_rows(6)
    reliability.case(
        kind="input",
        name="refine: every kind of defective ingest row",
        injected=(
            f"an ingest output of {len(good)} good rows and {len(bad)} hostile rows "
            f"({', '.join(b.kind for b in bad)}) mixed over 2 shards and 7 row groups; "
            "`jobs.refine` first with the default --max-error-fraction 0.01, then resumed with 1"
        ),
        checked=(
            "first run: exit 1 with one line naming max_error_fraction and no _SUCCESS; resumed "
            "run: exit 0, each bad row quarantined with a reason naming its defect, every good "
            "row exactly once with a seed byte-identical to refining it alone in-process"
        ),
    )
    rows: list[dict] = []
    for index, defect in enumerate(bad):  # good rows spread among the bad ones
        rows.append(defect.row)
        rows.extend(good[index : index + 1])
    half = len(rows) // 2
    data = resolve(str(tmp_path / "ingest"))
    write_ingest_output(data, [rows[:half], rows[half:]])
    out = resolve(str(tmp_path / "refine"))
    status = refine_main(["--input", data.uri, "--output", out.uri])
    line = one_error_line(capfd.readouterr().err)
    assert status == 1 and "max_error_fraction" in line, line
    assert not out.fs.exists(out.join("_SUCCESS"))
    reliability.observe(f"default tolerance: exit 1, `{line[:160]}...`")

    status = refine_main(["--input", data.uri, "--output", out.uri, "--max-error-fraction", "1"])
    assert status == 0, capfd.readouterr().err
    reasons = {r[schema.IMAGE_ID]: r[schema.REASON] for r in read_rows(out, "quarantine/")}
    expected = {b.row[schema.IMAGE_ID] or "": b for b in bad}
    # the empty id is stored as "" (not a usable id, but its quarantine row is kept)
    assert set(reasons) == {str(i) for i in expected}, sorted(reasons)
    wrong = {
        b.kind: reasons[str(i)]
        for i, b in expected.items()
        if b.keyword.lower() not in reasons[str(i)].lower()
    }
    assert not wrong, wrong
    refined = read_rows(out, "shards/")
    assert sorted(r[schema.IMAGE_ID] for r in refined) == sorted(r[schema.IMAGE_ID] for r in good)
    config = RefineConfig().seed_config()
    for row in refined:
        source = next(g for g in good if g[schema.IMAGE_ID] == row[schema.IMAGE_ID])
        alone = refine_row(source, config=config, num_classes=NUM_CLASSES)
        assert row == alone.columns, row[schema.IMAGE_ID]
    counts = read_manifest(out).counts
    reliability.observe(
        f"resumed with tolerance 1: {counts['input']} rows in, {counts['output']} out, "
        f"{counts['quarantined']} quarantined; {len(refined)} good rows byte-identical"
    )
    for kind in ("label_class_range", "pixel_limit", "unsafe_image_id", "cam_length"):
        image_id = next(str(i) for i, b in expected.items() if b.kind == kind)
        reliability.observe(f"{kind}: {reasons[image_id]}")


CORRUPT_SHARDS = (
    "empty",
    "truncated",
    "garbage",
    "not_parquet",
    "bad_footer",
    "damaged_pages",
    "wrong_schema",
    "missing",
)


@pytest.mark.parametrize("variant", CORRUPT_SHARDS)
def test_refine_names_a_corrupt_input_shard(
    tmp_path: Path, capfd, reliability, variant: str
) -> None:
    reliability.case(
        kind="input",
        name=f"refine: corrupt input shard ({variant})",
        injected=(
            "a committed ingest output of 2 shards whose second shard is "
            + {
                "empty": "a zero-byte file",
                "truncated": "cut to its first half",
                "garbage": "random bytes",
                "not_parquet": "a JPEG",
                "bad_footer": "intact but for a garbage footer between valid magic numbers",
                "damaged_pages": "intact in its footer but with every data page overwritten",
                "wrong_schema": "a valid Parquet file without the ingest columns",
                "missing": "deleted (still listed in the manifest)",
            }[variant]
        ),
        checked="`jobs.refine` exits 1 with one stderr line naming the shard; no _SUCCESS; "
        "the good shard is not modified",
    )
    good = hostile.good_ingest_rows(4)
    data = resolve(str(tmp_path / "ingest"))
    write_ingest_output(data, [good[:2], good[2:]], rows_per_group=1)
    damaged = data.join("shards/part-00001.parquet")
    if variant == "missing":
        data.fs.rm_file(damaged)
    else:
        data.fs.pipe_file(damaged, hostile.corrupt_parquet(data.fs.cat_file(damaged))[variant])
    before = data.fs.cat_file(data.join("shards/part-00000.parquet"))
    out = resolve(str(tmp_path / "refine"))
    status = refine_main(["--input", data.uri, "--output", out.uri])
    line = one_error_line(capfd.readouterr().err)
    assert status == 1, line
    assert "part-00001.parquet" in line, line
    assert not out.fs.exists(out.join("_SUCCESS"))
    assert data.fs.cat_file(data.join("shards/part-00000.parquet")) == before
    reliability.observe(f"stderr: {line}")


def test_refine_refuses_manifest_listing_escaping_path(tmp_path: Path, capfd, reliability) -> None:
    reliability.case(
        kind="input",
        name="refine: input manifest lists a path outside its directory",
        injected="the ingest manifest's `files` gains `shards/../../../etc/passwd`",
        checked="exit 1 with one line saying the listed path is unsafe; nothing read outside",
    )
    data = resolve(str(tmp_path / "ingest"))
    write_ingest_output(data, [hostile.good_ingest_rows(2)])
    hostile.list_missing_file(data, "shards/../../../etc/passwd")
    out = resolve(str(tmp_path / "refine"))
    status = refine_main(["--input", data.uri, "--output", out.uri])
    line = one_error_line(capfd.readouterr().err)
    assert status == 1
    assert "etc/passwd" in line and "manifest" in line.lower(), line
    reliability.observe(f"stderr: {line}")
