"""Confusion matrix and mIoU against hand-counted examples (docs/METHOD.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines.metrics import (
    ConfusionAccumulator,
    add_sparse,
    confusion_matrix,
    score_from_confusion,
    sparse_confusion,
)


def test_confusion_matrix_by_hand() -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 255]], np.uint8)
    conf = confusion_matrix(pred, gt, 3)
    expected = np.array(
        [
            # pred: 0  1  2  ignore
            [1, 1, 0, 0],  # gt 0
            [0, 2, 0, 1],  # gt 1 (one pixel predicted 255)
            [1, 0, 1, 0],  # gt 2
        ]
    )
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64
    assert conf.sum() == 7  # the gt-255 pixel is not counted, whatever its prediction


def test_scores_by_hand() -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 255]], np.uint8)
    score = score_from_confusion(confusion_matrix(pred, gt, 3))
    # class 0: TP 1, FP 1 (gt 2), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 (the 255) -> 2/4;
    # class 2: TP 1, FP 0 (the pixel on gt 255 does not count), FN 1 -> 1/2.
    assert score.per_class_iou == pytest.approx((1 / 3, 1 / 2, 1 / 2))
    assert score.miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert score.num_pixels == 7


def test_predicted_ignore_is_a_miss_not_a_false_positive() -> None:
    gt = np.array([1, 1, 1, 1])
    pred = np.array([1, 1, 255, 255])
    score = score_from_confusion(confusion_matrix(pred, gt, 2))
    assert score.per_class_iou[1] == pytest.approx(0.5)
    assert math.isnan(score.per_class_iou[0])


def test_out_of_space_prediction_counts_as_miss() -> None:
    gt = np.array([0, 1])
    pred = np.array([7, -1])
    conf = confusion_matrix(pred, gt, 2)
    np.testing.assert_array_equal(conf, [[0, 0, 1], [0, 0, 1]])


def test_absent_classes_are_nan_and_left_out_of_the_mean() -> None:
    gt = np.array([0, 0, 2, 2])
    pred = np.array([0, 0, 2, 0])
    score = score_from_confusion(confusion_matrix(pred, gt, 4))
    assert math.isnan(score.per_class_iou[1]) and math.isnan(score.per_class_iou[3])
    assert score.per_class_iou[0] == pytest.approx(2 / 3)
    assert score.per_class_iou[2] == pytest.approx(1 / 2)
    assert score.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    as_dict = score.as_dict(["bg", "a", "b", "c"])
    assert as_dict["per_class_iou"]["a"] is None
    assert as_dict["per_class_iou"]["b"] == pytest.approx(0.5)


def test_class_predicted_but_absent_from_gt_scores_zero() -> None:
    score = score_from_confusion(confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2))
    assert score.per_class_iou == pytest.approx((0.5, 0.0))


def test_all_ignored_gives_nan_miou() -> None:
    score = score_from_confusion(confusion_matrix(np.zeros(3), np.full(3, 255), 2))
    assert math.isnan(score.miou) and score.num_pixels == 0


def test_plain_square_matrix_is_accepted() -> None:
    score = score_from_confusion(np.array([[3, 1], [0, 4]]))
    assert score.per_class_iou == pytest.approx((3 / 4, 4 / 5))


def test_out_of_range_gt_raises() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros(2), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros(2), np.array([0, -1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3), np.zeros(2), 3)


def test_accumulator_equals_concatenated_images() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, (5, 6)) for _ in range(3)]
    preds = [rng.integers(0, 4, (5, 6)) for _ in range(3)]
    gts[1][0] = 255
    acc = ConfusionAccumulator(4)
    for p, g in zip(preds, gts, strict=True):
        acc.add(p, g)
    other = ConfusionAccumulator(4)
    other.add(preds[0], gts[0])
    acc.merge(other.matrix)
    whole = confusion_matrix(
        np.concatenate([p.ravel() for p in preds + preds[:1]]),
        np.concatenate([g.ravel() for g in gts + gts[:1]]),
        4,
    )
    np.testing.assert_array_equal(acc.matrix, whole)
    assert acc.score().miou == pytest.approx(score_from_confusion(whole).miou)


def test_sparse_confusion_sums_to_the_dense_matrix() -> None:
    rng = np.random.default_rng(0)
    total = np.zeros((7, 8), np.int64)
    dense = np.zeros((7, 8), np.int64)
    for _ in range(3):
        pred = rng.integers(0, 7, (9, 11)).astype(np.uint8)
        gt = rng.choice([0, 2, 5, 255], (9, 11)).astype(np.uint8)
        sparse = sparse_confusion(pred, gt, 7)
        assert len(sparse["idx"]) <= 3 * 7  # only the gt classes' rows are non-zero
        add_sparse(total, json.loads(json.dumps(sparse)))
        dense += confusion_matrix(pred, gt, 7)
    assert np.array_equal(total, dense)
    with pytest.raises(ValueError):
        add_sparse(total, {"idx": [7 * 8], "cnt": [1]})
