"""Evaluate stage without Ray: class spaces, one pair, the join plan, and whole units on files.

The prediction fixtures are a refine output (`tests.pipelines.train.inputs`) and a hand-made
pseudo_masks output (`write_pseudo_masks`: masks + index + manifest per docs/CONTRACTS.md), so these
tests do not depend on the pseudo-mask stage's own code.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.evaluate import EvaluateConfig
from pipelines.evaluate.plan import PredictionRef, make_plan, plan_units
from pipelines.evaluate.scoring import (
    EvaluationResult,
    RecordSum,
    convert_labels,
    format_table,
    label_conversion,
    miou_over,
    score_pair,
    score_unit,
    select_classes,
)
from pipelines.evaluate.stage import resolve_class_space
from pipelines.io import schema
from pipelines.io.class_spaces import COCO81, COCO91, VOC, ClassSpace
from pipelines.io.codecs import decode_label_map, encode_label_png
from pipelines.io.manifest import (
    FileEntry,
    InputRef,
    Manifest,
    StageOutput,
    read_manifest,
    write_parquet,
)
from pipelines.io.rows import RowRejected
from pipelines.io.storage import resolve, write_bytes_atomic
from pipelines.metrics import confusion_matrix, score_from_confusion
from tests.pipelines.train.inputs import make_refine_input

PSEUDO_SCHEMA = pa.schema(
    [
        (schema.IMAGE_ID, pa.string()),
        (schema.MASK, pa.string()),
        (schema.HEIGHT, pa.int32()),
        (schema.WIDTH, pa.int32()),
        (schema.LABELS, pa.list_(pa.int16())),
        (schema.CHECKPOINT_SHA256, pa.string()),
        (schema.SPLIT, pa.string()),
    ]
)


def write_pseudo_masks(
    uri: str,
    masks: Mapping[str, np.ndarray],
    *,
    class_names: tuple[str, ...],
    class_space: str = "custom",
    index_extra: list[dict] | None = None,
) -> Manifest:
    """A committed pseudo_masks output: masks/<id>.png, one index shard, manifest, _SUCCESS."""
    loc = resolve(uri)
    out = StageOutput.open(loc, stage="pseudo_masks", config={"t": 1}, inputs=[InputRef("x")])
    files, rows = [], []
    for image_id, mask in masks.items():
        rel = f"masks/{image_id}.png"
        data = encode_label_png(mask)
        write_bytes_atomic(loc, rel, data)
        files.append(FileEntry(path=rel, rows=None, bytes=len(data)))
        rows.append(
            {
                schema.IMAGE_ID: image_id,
                schema.MASK: rel,
                schema.HEIGHT: mask.shape[0],
                schema.WIDTH: mask.shape[1],
                schema.LABELS: sorted(int(c) for c in np.unique(mask) if 0 < c < 255),
                schema.CHECKPOINT_SHA256: "0" * 64,
                schema.SPLIT: "train",
            }
        )
    rows.extend(index_extra or [])
    files.append(
        write_parquet(loc, "shards/part-00000.parquet", pa.Table.from_pylist(rows, PSEUDO_SCHEMA))
    )
    return out.commit(
        files=files,
        counts={"input": len(rows), "output": len(masks), "quarantined": 0},
        class_names=class_names,
        class_space=class_space,
    )


def refine_pairs(manifest: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """image id -> (seed, gt, split) read straight from a refine output's shards."""
    import pyarrow.parquet as pq

    pairs = {}
    for path in manifest.file_paths("shards/"):
        with manifest.location.fs.open(path, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                pairs[row[schema.IMAGE_ID]] = (
                    decode_label_map(row[schema.SEED]),
                    decode_label_map(row[schema.GT]),
                    row[schema.SPLIT],
                )
    return pairs


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_select_classes_names_ids_and_errors() -> None:
    assert select_classes(VOC, None) == tuple(range(21))
    assert select_classes(VOC, ["dog", "0", " person ", "12"]) == (0, 12, 15)
    with pytest.raises(ValueError, match="average_over"):
        select_classes(VOC, ["unicorn"])
    with pytest.raises(ValueError, match="average_over"):
        select_classes(VOC, ["21"])


def test_conversions_are_explicit() -> None:
    assert label_conversion(None, VOC, "x") is None
    assert label_conversion(VOC, VOC, "x") is None
    assert label_conversion(COCO91, COCO81, "x") == "coco91->coco81"
    custom = ClassSpace("custom", ("background", "a"))
    with pytest.raises(ValueError, match="no mapping"):
        label_conversion(custom, VOC, "the prediction")
    labels = np.array([[0, 1, 13, 255], [90, 12, 200, 1]], np.uint8)  # 12 unused, 200 junk
    lenient = convert_labels(labels, "coco91->coco81", strict=False)
    assert lenient.tolist() == [[0, 1, 12, 255], [80, 255, 255, 1]]
    with pytest.raises(ValueError):
        convert_labels(labels, "coco91->coco81", strict=True)
    assert convert_labels(lenient, "coco81->coco91", strict=True).tolist()[0] == [0, 1, 13, 255]


def test_decode_label_map_checks_size_before_decoding() -> None:
    labels = np.zeros((6, 8), np.uint8)
    data = encode_label_png(labels)
    assert decode_label_map(data, "prediction", (6, 8)).shape == (6, 8)
    with pytest.raises(RowRejected, match="size mismatch: prediction is 6x8, expected 8x6"):
        decode_label_map(data, "prediction", (8, 6))
    rgb = io.BytesIO()
    Image.new("RGB", (4, 4)).save(rgb, format="PNG")
    with pytest.raises(RowRejected, match="undecodable prediction"):
        decode_label_map(rgb.getvalue(), "prediction")
    with pytest.raises(RowRejected, match="undecodable ground truth"):
        decode_label_map(b"\x89PNG not really", "ground truth")
    with pytest.raises(RowRejected, match="missing prediction"):
        decode_label_map(None, "prediction")


def test_score_pair_matches_confusion_matrix() -> None:
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    gt[:3] = 255
    pred = rng.integers(0, 5, (20, 30)).astype(np.uint8)  # 4 is outside: a miss
    assert np.array_equal(score_pair(pred, gt, 4), confusion_matrix(pred, gt, 4))
    with pytest.raises(RowRejected, match="size mismatch"):
        score_pair(pred[:, :-1], gt, 4)
    with pytest.raises(RowRejected, match="bad ground truth"):
        score_pair(pred, np.full_like(gt, 7), 4)


def test_miou_over_and_result_metrics() -> None:
    assert miou_over([0.5, float("nan"), 1.0], [0, 1, 2]) == 0.75
    assert miou_over([0.5, float("nan"), 1.0], [1]) is None
    space = ClassSpace("custom", ("background", "cat", "dog\x1b[31m"))
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1]], np.uint8)
    total = RecordSum(3)
    total.add_matrix("train", confusion_matrix(pred, gt, 3))
    total.gt_without_prediction["val"] = 2
    result = EvaluationResult(
        prediction={"uri": "file:///p", "stage": "refine"},
        ground_truth={"uri": "file:///g", "stage": "ingest"},
        space=space,
        average_over=(1,),
        total=total,
        counts={"scored": 1, "quarantined": 1},
        quarantine=(("x", "s", "size mismatch: a"),),
    )
    metrics = result.metrics()
    assert metrics["per_class_iou"] == {"background": 0.5, "cat": 2 / 3, "dog\x1b[31m": None}
    assert metrics["miou"] == pytest.approx(2 / 3)
    assert metrics["miou_all_classes"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert metrics["averaged_over"] == ["cat"] and metrics["classes_with_iou"] == 1
    assert metrics["quarantine_reasons"] == {"size mismatch": 1}
    table = format_table(metrics)
    assert "\x1b" not in table and "dog?[31m" in table
    assert " 66.67" in table and "(not averaged)" in table and "class space custom" in table


def test_plan_units_joins_by_id_and_quarantines_duplicates() -> None:
    refs = {i: PredictionRef(f"masks/{i}.png", -1) for i in ("a", "b", "c", "z")}
    gt_index = [
        ("shards/p0.parquet", [(0, ["a", "b"]), (1, ["b", None, "d"])]),
        ("shards/p1.parquet", [(0, ["c"])]),
    ]
    plan = plan_units(gt_index, refs)
    assert [(u["gt_path"], u["gt_row_group"]) for u in plan.units] == [
        ("shards/p0.parquet", 0),
        ("shards/p0.parquet", 1),
        ("shards/p1.parquet", 0),
    ]
    assert plan.units[0]["predictions"] == [
        [0, "a", "masks/a.png", -1],
        [1, "b", "masks/b.png", -1],
    ]
    assert plan.units[1]["predictions"] == [] and plan.units[1]["skip"] == [0, 1]
    assert (plan.predictions, plan.gt_rows, plan.prediction_without_gt) == (4, 6, 1)
    reasons = sorted(r for _, _, r in plan.quarantine)
    assert reasons == [
        "duplicate image_id in the ground truth",
        "missing image id in the ground truth",
    ]


def test_class_space_resolution(tmp_path) -> None:
    gt = make_refine_input(str(tmp_path / "refine"), count=2, val=0)
    empty = write_pseudo_masks(str(tmp_path / "pm"), {}, class_names=(), class_space="custom")
    space, pred_conv, gt_conv = resolve_class_space(empty, gt, None)
    assert space.class_names == gt.class_names and pred_conv is None and gt_conv is None
    with pytest.raises(ValueError, match="neither manifest"):
        resolve_class_space(empty, empty, None)
    assert resolve_class_space(empty, empty, "voc")[0] == VOC
    with pytest.raises(ValueError, match="no mapping"):
        resolve_class_space(empty, gt, "voc")
    with pytest.raises(ValueError, match="average_over"):
        EvaluateConfig(average_over=())


# ---------------------------------------------------------------------------------------------
# Whole units on local files (what each Ray task does), against an independent computation


def _run_units(pred: Manifest, gt: Manifest, num_classes: int) -> tuple[np.ndarray, list, dict]:
    """What the Ray job does, in-process: plan, score every unit, sum with `RecordSum`."""
    plan = make_plan(pred, gt)
    total = RecordSum(num_classes)
    for unit in plan.units:
        total.add(
            score_unit(unit, gt_loc=gt.location, pred_loc=pred.location, num_classes=num_classes)
        )
    summed = total.record()  # the format a task returns, read back as the driver does
    again = RecordSum(num_classes)
    again.add(summed)
    matrix = sum(again.matrices.values(), np.zeros((num_classes, num_classes + 1), np.int64))
    counts = {
        "scored": again.scored,
        "gt_null": again.gt_null,
        "gt_without_prediction": sum(again.gt_without_prediction.values()),
        "prediction_without_gt": plan.prediction_without_gt,
    }
    return matrix, [*plan.quarantine, *again.quarantine], counts


def test_refine_seeds_against_their_own_gt(tmp_path) -> None:
    manifest = make_refine_input(str(tmp_path / "refine"), count=6, val=2)
    k = len(manifest.class_names)
    total, quarantine, counts = _run_units(manifest, manifest, k)
    expected = sum(confusion_matrix(s, g, k) for s, g, _ in refine_pairs(manifest).values())
    assert np.array_equal(total, expected)
    assert quarantine == [] and counts["scored"] == 6 and counts["gt_without_prediction"] == 0
    assert 0 < score_from_confusion(total).miou <= 1


def test_pseudo_masks_with_mismatches(tmp_path) -> None:
    gt_manifest = make_refine_input(str(tmp_path / "refine"), count=5, val=1)
    k = len(gt_manifest.class_names)
    pairs = refine_pairs(gt_manifest)
    ids = sorted(pairs)
    masks = {ids[0]: pairs[ids[0]][0], ids[1]: pairs[ids[1]][1].copy()}
    masks[ids[1]][masks[ids[1]] == 255] = 0
    masks[ids[2]] = np.zeros((5, 7), np.uint8)  # wrong size: quarantined
    masks["not-in-gt"] = np.zeros((4, 4), np.uint8)
    hostile = {
        schema.IMAGE_ID: ids[3],
        schema.MASK: "../refine/shards/part-00000.parquet",
        schema.HEIGHT: 1,
        schema.WIDTH: 1,
        schema.LABELS: [],
        schema.CHECKPOINT_SHA256: "",
        schema.SPLIT: None,
    }
    pred = write_pseudo_masks(
        str(tmp_path / "pm"), masks, class_names=gt_manifest.class_names, index_extra=[hostile]
    )
    assert read_manifest(pred.location).stage == "pseudo_masks"
    total, quarantine, counts = _run_units(pred, gt_manifest, k)
    expected = confusion_matrix(masks[ids[0]], pairs[ids[0]][1], k) + confusion_matrix(
        masks[ids[1]], pairs[ids[1]][1], k
    )
    assert np.array_equal(total, expected)
    reasons = {image_id: reason for image_id, _, reason in quarantine}
    assert reasons[ids[2]].startswith("size mismatch: prediction is 5x7")
    assert reasons[ids[3]] == "mask path not listed in the manifest"
    # ids[3] (bad path) and ids[4] have no usable prediction; "not-in-gt" has no GT
    assert counts == {
        "scored": 2,
        "gt_null": 0,
        "gt_without_prediction": 2,
        "prediction_without_gt": 1,
    }


def test_storage_errors_fail_the_unit_and_missing_files_are_quarantined(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.evaluate import scoring
    from pipelines.io import storage
    from pipelines.io.codecs import encode_label_png
    from pipelines.io.storage import resolve, write_bytes_atomic

    loc = resolve(str(tmp_path))
    write_bytes_atomic(loc, "masks/a.png", encode_label_png(np.zeros((4, 5), np.uint8)))
    wanted = [[0, "a", "masks/a.png", -1], [1, "b", "masks/b.png", -1], [2, "c", "s.parquet", 0]]
    found = scoring._read_predictions(loc, wanted)
    assert isinstance(found["a"], bytes) and found["b"] == "mask file missing"
    assert found["c"].startswith("unreadable prediction shard s.parquet")  # listed but gone
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    def store_down(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(scoring, "read_row_group", store_down)
    with pytest.raises(ConnectionError):  # retried, then the unit fails: never quarantined
        scoring._read_predictions(loc, wanted[2:])
    monkeypatch.setattr(loc.fs, "cat_file", store_down)
    monkeypatch.setattr(
        loc.fs, "cat", lambda paths, on_error="raise": dict.fromkeys(paths, OSError())
    )
    with pytest.raises(ConnectionError):
        scoring._read_predictions(loc, wanted[:1])
