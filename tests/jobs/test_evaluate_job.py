"""`python -m jobs.evaluate` through `main([...])`: numbers, stage output, errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from jobs.evaluate import main
from pipelines.evaluate import stage as evaluate
from pipelines.evaluate.ranking import sample_key
from pipelines.io import schema
from pipelines.io.codecs import decode_label_map
from pipelines.io.manifest import read_manifest
from pipelines.io.storage import exists, read_bytes, resolve
from pipelines.metrics import confusion_matrix, score_from_confusion
from tests.pipelines.evaluate.test_stage import refine_pairs, write_pseudo_masks
from tests.pipelines.refine.test_stage import synthetic_row, write_ingest_output
from tests.pipelines.train.inputs import make_refine_input


@pytest.fixture(scope="module")
def refine_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_refine_input(str(tmp_path_factory.mktemp("eval_job") / "refine")).location.uri


def test_seeds_json_matches_an_independent_computation(
    ray_session: None, refine_uri: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--input", refine_uri, "--gt", refine_uri, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    manifest = read_manifest(refine_uri)
    k = len(manifest.class_names)
    pairs = refine_pairs(manifest)
    expected = score_from_confusion(sum(confusion_matrix(s, g, k) for s, g, _ in pairs.values()))
    assert metrics["miou"] == pytest.approx(expected.miou)
    assert list(metrics["per_class_iou"].values()) == pytest.approx(list(expected.per_class_iou))
    assert metrics["class_space"] == "custom" and metrics["num_classes"] == k
    assert metrics["counts"]["scored"] == len(pairs) == 8
    val = [confusion_matrix(s, g, k) for s, g, split in pairs.values() if split == "val"]
    assert metrics["by_split"]["val"] == {
        "images": 2,
        "miou": pytest.approx(score_from_confusion(sum(val)).miou),
    }


def test_pseudo_masks_on_s3_against_ingest_gt(
    ray_session: None,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Ingest GT in 4 row groups (4 units), 2 units per task; output written, then reused."""
    rows = [synthetic_row(i) for i in range(7)]
    gt_loc = resolve(f"{s3_bucket}/ingest")
    gt = write_ingest_output(gt_loc, rows, rows_per_shard=4, rows_per_group=2)
    monkeypatch.setattr(evaluate, "TARGET_TASKS", 2)
    truth = {r[schema.IMAGE_ID]: decode_label_map(r[schema.GT]) for r in rows}
    ids = sorted(truth)
    masks = {i: truth[i].copy() for i in ids[:5]}
    for mask in masks.values():
        mask[mask == 255] = 0
        mask[:, :10] = 0  # some errors
    masks[ids[5]] = np.zeros((3, 3), np.uint8)  # size mismatch
    masks["extra"] = np.zeros((3, 3), np.uint8)  # no ground truth
    pred_uri = f"{s3_bucket}/pseudo_masks"
    write_pseudo_masks(pred_uri, masks, class_names=gt.class_names)
    output = f"{s3_bucket}/evaluate"
    argv = ["--input", pred_uri, "--gt", gt_loc.uri, "--output", output, "--average-over", "1,2,3"]
    assert main(argv) == 1  # 1 of 6 pairs quarantined: above the default gate of 1%
    assert "1 of 6 pairs quarantined (16.7%" in capsys.readouterr().err
    assert not exists(resolve(output), "_SUCCESS")
    argv += ["--max-error-fraction", "0.2"]  # not fingerprinted: the same output, resumed
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "mIoU" in captured.out and "(not averaged)" in captured.out
    assert "size mismatch" in captured.out and "4 GT row groups" in captured.err
    # The stage's own report, on S3 beside its outputs (not in the manifest: a derived view).
    report = resolve(output).child("report")
    assert f"evaluate: report {report.uri}/index.html" in captured.err
    page = read_bytes(report, "index.html").decode()
    assert "Confusion of the pseudo masks" in page and "Training curves" not in page
    assert exists(report, "confusion.png") and report.fs.glob(report.join("strips") + "/*.png")

    k = len(gt.class_names)
    matrix = sum(confusion_matrix(masks[i], truth[i], k) for i in ids[:5])
    iou = score_from_confusion(matrix).per_class_iou
    manifest = read_manifest(output)
    metrics = json.loads(read_bytes(manifest.location, "metrics.json"))
    assert metrics == manifest.metrics
    assert metrics["miou"] == pytest.approx(np.nanmean(iou[1:4]))
    assert list(metrics["per_class_iou"].values()) == pytest.approx(list(iou), nan_ok=True)
    assert metrics["counts"] == {
        "predictions": 7,
        "gt_rows": 7,
        "scored": 5,
        "prediction_without_gt": 1,
        "gt_null": 0,
        "gt_without_prediction": 1,
        "quarantined": 1,
    }
    assert manifest.stage == "evaluate" and manifest.counts["quarantined"] == 1
    files = ["metrics.json", "confusion.json", "quarantine/evaluate.parquet"]
    assert [f.path for f in manifest.files] == files
    confusion = json.loads(read_bytes(manifest.location, "confusion.json"))
    assert confusion["class_names"] == list(gt.class_names)
    assert np.array_equal(np.asarray(confusion["matrix"]), matrix)
    ranked = metrics["images_ranked"]
    per_image = {
        i: score_from_confusion(confusion_matrix(masks[i], truth[i], k)).miou for i in ids[:5]
    }
    order = sorted(per_image, key=lambda i: (per_image[i], sample_key(i)))
    assert [e["image_id"] for e in ranked["worst"]] == order
    assert {e["image_id"] for e in ranked["sample"]} == set(ids[:5])  # 5 scored, all sampled
    assert all(e["prediction"]["row_group"] == -1 for e in ranked["sample"])  # mask files

    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err
    assert json.loads(captured.out)["miou"] == metrics["miou"]

    # nothing in common: exit 1, and no result committed
    write_pseudo_masks(f"{s3_bucket}/other", {"extra": masks["extra"]}, class_names=gt.class_names)
    other_out = resolve(f"{s3_bucket}/other_eval")
    assert (
        main(["--input", f"{s3_bucket}/other", "--gt", gt_loc.uri, "--output", other_out.uri]) == 1
    )
    assert "no image had both" in capsys.readouterr().err
    assert not exists(other_out, "_SUCCESS")


def test_incomplete_input_is_one_line_exit_1(
    refine_uri: str, tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    code = main(["--input", str(tmp_path / "nowhere"), "--gt", refine_uri])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "incomplete" in err


@pytest.mark.parametrize(
    "extra",
    [["--classes", "vocx"], ["--average-over", ","], ["--no-such-flag"], ["--gt"]],
)
def test_usage_errors_exit_2(refine_uri: str, extra: list[str]) -> None:
    argv = ["--input", refine_uri] + ([] if extra == ["--gt"] else ["--gt", refine_uri])
    assert main(argv + extra) == 2


def test_resolve_is_a_usage_error(refine_uri: str) -> None:
    assert resolve(refine_uri).is_local
    assert main(["--input", "ftp://x/y", "--gt", refine_uri]) == 2
