"""Training curves and the confusion heatmap render to PNG without a display."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.report.plots import confusion_png, curves_png, present_classes


def test_curves_skip_missing_and_non_finite_values() -> None:
    history = [
        {"iteration": 10, "loss": 2.0, "loss_seeding": 1.5, "lr": 1e-3, "images_per_s": 4.0},
        {"iteration": 20, "loss": float("nan"), "lr": 9e-4},
        {"iteration": 30, "loss": 1.0, "loss_seeding": 0.8, "lr": 5e-4, "images_per_s": 5.0},
    ]
    png = curves_png(history, losses=("loss", "loss_seeding", "loss_boundary"), title="t")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 600


def test_confusion_shows_present_classes_only() -> None:
    k = 91
    matrix = np.zeros((k, k + 1), np.int64)
    matrix[0, 0], matrix[0, 5] = 90, 10
    matrix[5, 5], matrix[5, k] = 30, 10  # 10 pixels of class 5 predicted as ignore
    matrix[7, 0] = 4  # class 7 never predicted
    assert present_classes(matrix) == [0, 5, 7]
    names = ["background", *(f"c{i}" for i in range(1, k))]
    image = Image.open(io.BytesIO(confusion_png(matrix, names, title="t")))
    assert image.format == "PNG"
    with pytest.raises(ValueError, match="expected"):
        confusion_png(matrix[:, :k], names, title="t")
