"""Refine stage: pure row/unit functions without Ray, then the Ray Data stage on synthetic data.

The input is a fixed synthetic set (`pipelines.synthetic.shapes`, seed 0) written as an ingest
output (ingest columns, row groups of 4 rows, a committed `ingest` manifest), so these tests do not
depend on the ingest stage's own code path.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.ingest.rows import SHARD_SCHEMA
from pipelines.io import schema
from pipelines.io.codecs import decode_label_map
from pipelines.io.manifest import (
    FileEntry,
    InputRef,
    Manifest,
    StageConflictError,
    StageOutput,
    read_manifest,
)
from pipelines.io.rows import RowRejected
from pipelines.io.storage import Location, resolve, write_bytes_atomic
from pipelines.metrics import add_sparse, confusion_matrix, to_sparse
from pipelines.refine import RefineConfig, run_refine
from pipelines.refine.rows import REFINE_SCHEMA, refine_row
from pipelines.refine.stage import stage_config
from pipelines.refine.units import (
    WorkUnit,
    build_metrics,
    enumerate_units,
    finish_unit,
    process_unit,
    refine_part,
)
from pipelines.seeds import SeedConfig, cam_argmax, refine_seed
from pipelines.synthetic.dataset import ingest_row
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample
from pipelines.units import record_rel, shard_rel

NUM_IMAGES = 16
HEIGHT, WIDTH = 128, 160
NUM_CLASSES = SYNTHETIC_CLASSES.num_classes


def synthetic_row(index: int, *, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> dict:
    """One ingest row of synthetic sample `index` (JPEG image, float16 CAM, PNG GT)."""
    sample = generate_sample(index, seed=seed, height=height, width=width)
    return ingest_row(sample, split="val" if index % 4 == 3 else "train")


def write_ingest_output(
    loc: Location,
    rows: Sequence[dict],
    *,
    rows_per_shard: int = 8,
    rows_per_group: int = 4,
) -> Manifest:
    """Writes `rows` as a committed ingest output: shards/part-XXXXX.parquet + manifest."""
    out = StageOutput.open(
        loc, stage="ingest", config={"test": len(rows)}, inputs=[InputRef("synthetic://0")]
    )
    files = []
    for number, start in enumerate(range(0, len(rows), rows_per_shard)):
        table = pa.Table.from_pylist(list(rows[start : start + rows_per_shard]), SHARD_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=rows_per_group)
        rel = f"shards/part-{number:05d}.parquet"
        write_bytes_atomic(loc, rel, buffer.getvalue())
        files.append(FileEntry(rel, table.num_rows, len(buffer.getvalue())))
    out.commit(
        files=files,
        counts={"input": len(rows), "output": len(rows), "quarantined": 0},
        class_names=SYNTHETIC_CLASSES.class_names,
        class_space="custom",
    )
    return read_manifest(loc)


def read_refine_rows(loc: Location) -> list[dict[str, Any]]:
    """Every row of the shards a committed refine manifest lists."""
    manifest = read_manifest(loc)
    assert manifest.stage == "refine"
    rows: list[dict[str, Any]] = []
    for path in manifest.file_paths("shards/"):
        with loc.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        assert table.schema.names == list(schema.REFINE_COLUMNS)
        rows.extend(table.to_pylist())
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [synthetic_row(i) for i in range(NUM_IMAGES)]


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory: pytest.TempPathFactory, rows: list[dict]) -> Location:
    loc = resolve(str(tmp_path_factory.mktemp("refine_input") / "ingest"))
    write_ingest_output(loc, rows)
    return loc


def _planes(row: dict) -> np.ndarray:
    n = len(row[schema.CAM_CLASSES])
    return (
        np.frombuffer(row[schema.CAM], np.float16)
        .reshape(n, row[schema.HEIGHT], row[schema.WIDTH])
        .astype(np.float32)
    )


def _rgb(row: dict) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(row[schema.IMAGE])).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Pure parts (no Ray)


def test_config_takes_method_defaults_and_overrides() -> None:
    weaktr = RefineConfig().seed_config()
    assert (weaktr.method, weaktr.bilateral_sxy, weaktr.gt_prob) == ("weaktr", 83, 0.7)
    clip_es = RefineConfig(method="clip-es", iterations=5).seed_config()
    assert (clip_es.gaussian_sxy, clip_es.bilateral_sxy, clip_es.iterations) == (1, 67, 5)
    assert stage_config(RefineConfig(bg_threshold=0.43)) == stage_config(RefineConfig())
    assert stage_config(RefineConfig(max_error_fraction=0.5)) == stage_config(RefineConfig())
    with pytest.raises(ValueError, match="bg_threshold"):
        RefineConfig(bg_threshold=1.5)
    with pytest.raises(ValueError, match="method"):
        RefineConfig(method="psa")


def test_refine_row_matches_the_pure_seed_function(rows: list[dict]) -> None:
    row = rows[0]
    config = SeedConfig.for_method("weaktr")
    refined = refine_row(row, config=config, num_classes=NUM_CLASSES)
    expected = refine_seed(_rgb(row), _planes(row), row[schema.CAM_CLASSES], config=config)
    np.testing.assert_array_equal(refined.seed, expected)
    np.testing.assert_array_equal(decode_label_map(refined.columns[schema.SEED]), expected)
    np.testing.assert_array_equal(
        refined.argmax, cam_argmax(_planes(row), row[schema.CAM_CLASSES], bg_threshold=0.43)
    )
    assert set(refined.columns) == set(schema.REFINE_COLUMNS)
    assert refined.columns[schema.IMAGE] == row[schema.IMAGE]  # bytes as given
    assert refined.gt is not None and refined.gt.shape == (HEIGHT, WIDTH)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({schema.CAM: b"\x00" * 10}, "undecodable CAM"),
        ({schema.IMAGE: b"not an image"}, "undecodable image"),
        ({schema.HEIGHT: HEIGHT + 1}, "CAM"),  # CAM byte count no longer matches
        ({schema.GT: b"\x89PNG broken"}, "ground truth"),
        ({schema.CAM_CLASSES: None}, "undecodable CAM"),
    ],
)
def test_refine_row_rejects_bad_rows(rows: list[dict], change: dict, reason: str) -> None:
    with pytest.raises(RowRejected, match=reason):
        refine_row({**rows[1], **change}, config=SeedConfig(), num_classes=NUM_CLASSES)


def test_refine_row_rejects_class_ids_outside_the_space(rows: list[dict]) -> None:
    classes = [c + NUM_CLASSES for c in rows[1][schema.CAM_CLASSES]]
    with pytest.raises(RowRejected, match="cannot refine"):
        refine_row(
            {**rows[1], schema.CAM_CLASSES: classes}, config=SeedConfig(), num_classes=NUM_CLASSES
        )


def test_refine_row_rejects_an_image_of_another_size(rows: list[dict]) -> None:
    other = synthetic_row(1, height=HEIGHT, width=WIDTH + 16)
    with pytest.raises(RowRejected, match="image is"):
        refine_row(
            {**rows[1], schema.IMAGE: other[schema.IMAGE]},
            config=SeedConfig(),
            num_classes=NUM_CLASSES,
        )


def test_process_unit_quarantines_bad_rows_and_records_last(
    tmp_path: Any, rows: list[dict]
) -> None:
    input_loc = resolve(str(tmp_path / "in"))
    bad = {**rows[2], schema.CAM: b"\x01\x02\x03"}
    write_ingest_output(input_loc, [rows[0], rows[1], bad, rows[3]])
    units, _ = enumerate_units(input_loc, read_manifest(input_loc))
    pieces = (("shards/part-00000.parquet", 0, 4),)
    assert [(u.name, u.pieces, u.rows) for u in units] == [("part-00000-rg0000", pieces, 4)]
    output_loc = resolve(str(tmp_path / "out"))
    record = process_unit(
        units[0],
        input_loc=input_loc,
        output_loc=output_loc,
        config=SeedConfig(),
        num_classes=NUM_CLASSES,
    )
    assert (record["input_rows"], record["output"], record["quarantined"]) == (4, 3, 1)
    assert [f["path"] for f in record["files"]] == [
        "shards/part-00000-rg0000.parquet",
        "quarantine/part-00000-rg0000.parquet",
    ]
    quarantined = pq.read_table(tmp_path / "out/quarantine/part-00000-rg0000.parquet").to_pylist()
    assert quarantined[0][schema.IMAGE_ID] == rows[2][schema.IMAGE_ID]
    assert "undecodable CAM" in quarantined[0][schema.REASON]
    table = pq.read_table(tmp_path / "out" / shard_rel(units[0].name))
    assert table.schema.equals(REFINE_SCHEMA)
    assert table.column(schema.IMAGE_ID).to_pylist() == [
        r[schema.IMAGE_ID] for r in (rows[0], rows[1], rows[3])
    ]
    on_disk = json.loads((tmp_path / "out" / record_rel(units[0].name)).read_text())
    assert on_disk["confusion"]["train"]["images"] == 2  # rows 0 and 1; row 3 is val
    assert on_disk["confusion"]["val"]["images"] == 1
    seeds = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)
    add_sparse(seeds, on_disk["confusion"]["train"]["seeds"])  # sparse counts
    size = (HEIGHT, WIDTH)
    gts = [decode_label_map(r[schema.GT], "gt", size) for r in rows[:2]]
    assert seeds.sum() == sum(int((gt != 255).sum()) for gt in gts)  # every valid GT pixel


def test_what_a_unit_writes_does_not_depend_on_its_parts(tmp_path: Any, rows: list[dict]) -> None:
    input_loc = resolve(str(tmp_path / "in"))
    bad = {**rows[2], schema.CAM: b"\x01\x02\x03"}
    write_ingest_output(input_loc, [rows[0], rows[1], bad, rows[3]], rows_per_group=2)
    (unit,), _ = enumerate_units(input_loc, read_manifest(input_loc))
    assert len(unit.pieces) == 2  # parts cross the row groups' border
    kwargs = dict(input_loc=input_loc, config=SeedConfig(), num_classes=NUM_CLASSES)
    whole = process_unit(unit, output_loc=resolve(str(tmp_path / "one")), **kwargs)
    fields = asdict(unit)
    parts = [refine_part(fields, a, b, **kwargs) for a, b in [(0, 1), (1, 3), (3, 4)]]
    three = resolve(str(tmp_path / "three"))
    split = finish_unit(fields, *parts, output_loc=three, num_classes=NUM_CLASSES)
    assert (split["parts"], whole["parts"]) == (3, 1)
    for key in ("input_rows", "output", "quarantined", "reasons", "confusion", "files"):
        assert split[key] == whole[key], key
    for entry in whole["files"]:
        one = (tmp_path / "one" / entry["path"]).read_bytes()
        assert (tmp_path / "three" / entry["path"]).read_bytes() == one, entry["path"]


# ---------------------------------------------------------------------------------------------
# The stage


def test_stage_seeds_beat_cam_argmax(
    ray_session: None, ingest_dir: Location, tmp_path: Any
) -> None:
    output = resolve(str(tmp_path / "refine"))
    lines: list[str] = []
    result = run_refine(ingest_dir.uri, output.uri, RefineConfig(), report=lines.append)
    assert result.ok and not result.skipped
    assert result.counts == {"input": NUM_IMAGES, "output": NUM_IMAGES, "quarantined": 0}
    manifest = read_manifest(output)
    metrics = manifest.metrics
    assert metrics is not None
    argmax_miou, seeds_miou = metrics["cam_argmax"]["miou"], metrics["seeds"]["miou"]
    print(
        f"\n[refine weaktr, {NUM_IMAGES} synthetic {HEIGHT}x{WIDTH} images] "
        f"CAM argmax mIoU {argmax_miou:.4f} -> CRF seeds mIoU {seeds_miou:.4f}"
    )
    assert seeds_miou > argmax_miou + 0.03
    assert metrics["miou"] == seeds_miou
    assert metrics["class_space"] == "custom" and metrics["gt_images"] == NUM_IMAGES
    assert set(metrics["by_split"]) == {"train", "val"}
    assert set(metrics["per_class_iou"]) == set(SYNTHETIC_CLASSES.class_names)
    assert manifest.class_names == SYNTHETIC_CLASSES.class_names
    assert manifest.inputs[0].manifest_sha256 == read_manifest(ingest_dir).sha256
    # by default one unit holds every row group of these small rows: one shard, one record
    assert [f.path for f in manifest.files] == ["shards/part-00000-rg0000.parquet"]
    assert [p.name for p in (tmp_path / "refine" / "_units").iterdir()] == [
        "part-00000-rg0000.json"
    ]
    out_rows = read_refine_rows(output)
    assert sorted(r[schema.IMAGE_ID] for r in out_rows) == [f"syn_{i:06d}" for i in range(16)]
    for row in out_rows:
        seed = decode_label_map(row[schema.SEED])
        assert seed.shape == (row[schema.HEIGHT], row[schema.WIDTH])
        # weaktr labels every pixel: no 255, only background and the image's own classes
        assert set(np.unique(seed).tolist()) <= {0, *row[schema.LABELS]}
    assert any("images/s" in line for line in lines)

    again: list[str] = []
    assert run_refine(ingest_dir.uri, output.uri, RefineConfig(), report=again.append).skipped
    assert "nothing to do" in again[0]
    with pytest.raises(StageConflictError, match="bilateral_sxy|config differs"):
        run_refine(ingest_dir.uri, output.uri, RefineConfig(bilateral_sxy=50), report=print)


def test_stage_clip_es_puts_255_only_on_low_confidence_pixels(
    ray_session: None, ingest_dir: Location, rows: list[dict], tmp_path: Any
) -> None:
    output = resolve(str(tmp_path / "refine"))
    config = RefineConfig(method="clip-es")
    result = run_refine(ingest_dir.uri, output.uri, config, report=lambda _: None)
    assert result.ok
    by_id = {r[schema.IMAGE_ID]: r for r in rows}
    ignored = 0
    for row in read_refine_rows(output):
        seed = decode_label_map(row[schema.SEED])
        source = by_id[row[schema.IMAGE_ID]]
        # exactly the pure recipe: 255 where its CRF confidence < 0.95 and nowhere else
        expected = refine_seed(
            _rgb(source),
            _planes(source),
            source[schema.CAM_CLASSES],
            config=config.seed_config(),
        )
        np.testing.assert_array_equal(seed, expected)
        assert set(np.unique(seed).tolist()) <= {0, 255, *row[schema.LABELS]}
        ignored += int(np.count_nonzero(seed == 255))
    assert ignored > 0


def test_stage_quarantines_and_enforces_the_error_limit(
    ray_session: None, rows: list[dict], tmp_path: Any
) -> None:
    input_loc = resolve(str(tmp_path / "in"))
    bad = {**rows[5], schema.CAM: rows[5][schema.CAM][:-2]}
    write_ingest_output(input_loc, [*rows[:5], bad], rows_per_group=3)
    output = resolve(str(tmp_path / "out"))
    config = RefineConfig(rows_per_unit=3)  # a unit per row group
    failed = run_refine(input_loc.uri, output.uri, config, report=lambda _: None)
    assert not failed.ok and "1 of 6 rows quarantined" in failed.message
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    # a higher tolerance resumes the same output (the tolerance is not part of the run)
    lines: list[str] = []
    tolerant = RefineConfig(rows_per_unit=3, max_error_fraction=0.5)
    result = run_refine(input_loc.uri, output.uri, tolerant, report=lines.append)
    assert result.ok and result.units_run == 0 and "resuming: 2 of 2" in lines[0]
    manifest = read_manifest(output)
    assert manifest.counts == {"input": 6, "output": 5, "quarantined": 1}
    assert "quarantine/part-00000-rg0001.parquet" in [f.path for f in manifest.files]
    assert manifest.extra["quarantine_reasons"] == {"undecodable CAM": 1}


def test_stage_resumes_partial_outputs_without_duplicates(
    ray_session: None, ingest_dir: Location, tmp_path: Any
) -> None:
    output = resolve(str(tmp_path / "refine"))
    config = RefineConfig(rows_per_unit=4)  # a unit per row group
    source = read_manifest(ingest_dir)
    # An interrupted earlier attempt: its run record, one finished unit (shard + record), a
    # torn shard without a record, and a stray file nobody would list.
    StageOutput.open(
        output, stage="refine", config=stage_config(config), inputs=[source.input_ref()]
    )
    units, _ = enumerate_units(ingest_dir, source, config.rows_per_unit)
    finished = process_unit(
        units[0],
        input_loc=ingest_dir,
        output_loc=output,
        config=config.seed_config(),
        num_classes=NUM_CLASSES,
    )
    finished_shard = tmp_path / "refine" / shard_rel(units[0].name)
    before = finished_shard.stat().st_mtime_ns
    torn = tmp_path / "refine" / shard_rel(units[1].name)
    torn.write_bytes(b"PAR1 half a file")
    stray = tmp_path / "refine" / "shards" / "part-99999-rg0000.parquet"
    stray.write_bytes(b"stray")

    lines: list[str] = []
    result = run_refine(ingest_dir.uri, output.uri, config, report=lines.append)
    assert result.ok and result.units_run == len(units) - 1
    assert "resuming: 1 of 4 units" in lines[0]
    assert finished_shard.stat().st_mtime_ns == before  # not redone
    manifest = read_manifest(output)
    paths = [f.path for f in manifest.files]
    assert "shards/part-99999-rg0000.parquet" not in paths
    assert shard_rel(units[1].name) in paths
    ids = [r[schema.IMAGE_ID] for r in read_refine_rows(output)]
    assert len(ids) == NUM_IMAGES and len(set(ids)) == NUM_IMAGES  # one row per image
    assert manifest.counts["output"] == NUM_IMAGES
    assert finished["output"] == units[0].rows
    # the metrics count every unit once, the finished one included
    assert manifest.metrics is not None and manifest.metrics["gt_images"] == NUM_IMAGES


@pytest.mark.slow
def test_stage_round_trips_through_s3(
    ray_session: None, s3_bucket: str, rows: list[dict], tmp_path: Any
) -> None:
    input_loc = resolve(f"{s3_bucket}/run/ingest")
    write_ingest_output(input_loc, rows[:8], rows_per_group=4)
    output = resolve(f"{s3_bucket}/run/refine")
    result = run_refine(input_loc.uri, output.uri, RefineConfig(), report=lambda _: None)
    assert result.ok and result.counts["output"] == 8
    assert output.fs.exists(output.join("_SUCCESS"))
    out_rows = read_refine_rows(output)
    assert sorted(r[schema.IMAGE_ID] for r in out_rows) == [r[schema.IMAGE_ID] for r in rows[:8]]
    local_in = resolve(str(tmp_path / "in"))
    write_ingest_output(local_in, rows[:8], rows_per_group=4)
    local_out = resolve(str(tmp_path / "out"))
    run_refine(local_in.uri, local_out.uri, RefineConfig(), report=lambda _: None)
    local = {r[schema.IMAGE_ID]: r[schema.SEED] for r in read_refine_rows(local_out)}
    assert {r[schema.IMAGE_ID]: r[schema.SEED] for r in out_rows} == local
    assert read_manifest(output).metrics == read_manifest(local_out).metrics


def test_refuses_an_input_that_is_not_an_ingest_output(tmp_path: Any) -> None:
    other = resolve(str(tmp_path / "train"))
    StageOutput.open(other, stage="train", config={}, inputs=[]).commit(
        files=[],
        counts={"input": 0, "output": 0, "quarantined": 0},
        class_names=SYNTHETIC_CLASSES.class_names,
        class_space="custom",
    )
    with pytest.raises(ValueError, match="not an ingest output"):
        run_refine(other.uri, str(tmp_path / "out"), RefineConfig(), report=lambda _: None)


def test_work_units_are_named_from_their_input(ingest_dir: Location) -> None:
    source = read_manifest(ingest_dir)  # two shards of two row groups of 4 rows
    units, rows = enumerate_units(ingest_dir, source, 4)
    assert rows == 4 and units == [
        WorkUnit(f"part-0000{s}-rg000{g}", ((f"shards/part-0000{s}.parquet", g, 4),), 4)
        for s in (0, 1)
        for g in (0, 1)
    ]
    # whole row groups, at most rows_per_unit rows; across shards
    assert [u.name for u in enumerate_units(ingest_dir, source, 7)[0]] == [
        f"part-0000{s}-rg000{g}" for s in (0, 1) for g in (0, 1)
    ]
    (first, second), _ = enumerate_units(ingest_dir, source, 12)
    assert (first.name, first.rows, second.name, second.rows) == (
        "part-00000-rg0000",
        12,
        "part-00001-rg0001",
        4,
    )
    assert first.pieces[-1] == ("shards/part-00001.parquet", 0, 4)
    # the default: sized for ~96 MiB shards, which these small rows are far from
    (whole,), rows = enumerate_units(ingest_dir, source)
    assert whole.rows == NUM_IMAGES and len(whole.pieces) == 4 and rows >= NUM_IMAGES


def test_metrics_sum_sparse_records_and_the_dense_ones_of_older_runs() -> None:
    rng = np.random.default_rng(1)
    pred = rng.integers(0, NUM_CLASSES, (6, 7)).astype(np.uint8)
    gt = rng.choice([0, 1, 255], (6, 7)).astype(np.uint8)
    matrix = confusion_matrix(pred, gt, NUM_CLASSES)

    def record(form: Any) -> dict[str, Any]:
        return {"confusion": {"train": {"images": 1, "cam_argmax": form, "seeds": form}}}

    names = [f"c{i}" for i in range(NUM_CLASSES)]
    kwargs = dict(class_names=names, class_space="custom", bg_threshold=0.43)
    sparse = build_metrics([record(to_sparse(matrix))] * 2, **kwargs)
    mixed = build_metrics([record(to_sparse(matrix)), record(matrix.tolist())], **kwargs)
    assert sparse == mixed and sparse is not None and sparse["gt_images"] == 2
    with pytest.raises(ValueError, match="shape"):
        build_metrics([record([[1, 2], [3, 4]])], **kwargs)
