"""The report's plots, rendered with matplotlib's Agg canvas to PNG bytes (no display, no pyplot
global state): training curves and a confusion-matrix heatmap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LABEL_CHARS = 24  # class names on the heatmap's axes are cut to this


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _series(history: Sequence[Mapping[str, object]], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of the entries with a finite number under `key`."""
    xs, ys = [], []
    for entry in history:
        x, y = entry.get("iteration"), entry.get(key)
        if isinstance(x, int | float) and isinstance(y, int | float) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def curves_png(
    history: Sequence[Mapping[str, object]], *, losses: Sequence[str], title: str
) -> bytes:
    """Three panels over the iteration: the `losses` (history keys, e.g. "loss",
    "loss_seeding"), the learning rate ("lr") and the throughput ("images_per_s").

    Args:
        history: one mapping per logged iteration (`iteration` and the keys above; missing or
            non-finite values are skipped).
        losses: the loss keys to draw, in the legend's order.
        title: the figure's title.
    """
    figure = Figure(figsize=(12, 3.4), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(1, 3)
    for key in losses:
        xs, ys = _series(history, key)
        if xs:
            axes[0].plot(xs, ys, label=key)
    axes[0].set_title("losses")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    for ax, key, name in ((axes[1], "lr", "learning rate"), (axes[2], "images_per_s", "images/s")):
        xs, ys = _series(history, key)
        ax.plot(xs, ys)
        ax.set_title(name)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    return _png(figure)


def present_classes(matrix: np.ndarray) -> list[int]:
    """Class ids with ground-truth pixels or predictions in a K x (K + 1) confusion matrix."""
    k = matrix.shape[0]
    counts = matrix.sum(axis=1) + matrix[:, :k].sum(axis=0)
    return [int(i) for i in np.flatnonzero(counts)]


def confusion_png(matrix: np.ndarray, class_names: Sequence[str], *, title: str) -> bytes:
    """Heatmap of a K x (K + 1) confusion matrix (rows: ground truth, columns: prediction, the
    last one "ignore"), each row divided by its pixels, over the `present_classes` only.

    Raises:
        ValueError: the matrix is not K x (K + 1) for the K class names.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    k = len(class_names)
    if matrix.shape != (k, k + 1):
        raise ValueError(f"confusion matrix of shape {matrix.shape}, expected ({k}, {k + 1})")
    shown = present_classes(matrix)
    columns = shown + ([k] if matrix[shown, k].any() else [])
    rows = matrix[np.ix_(shown, columns)]
    totals = matrix[shown].sum(axis=1, keepdims=True)
    normalised = np.divide(rows, totals, out=np.zeros_like(rows), where=totals > 0)
    names = [str(class_names[i])[:MAX_LABEL_CHARS] for i in shown]
    side = max(4.0, 0.32 * len(shown) + 2.5)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(normalised, vmin=0, vmax=1, cmap="viridis")
    figure.colorbar(image, ax=ax, label="share of the row's pixels")
    ax.set_xticks(range(len(columns)), [*names, "ignore"][: len(columns)], rotation=90, fontsize=8)
    ax.set_yticks(range(len(shown)), names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if len(shown) <= 25:
        for (i, j), value in np.ndenumerate(normalised):
            if value >= 0.005:
                colour = "black" if value > 0.6 else "white"
                ax.text(
                    j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7, color=colour
                )
    return _png(figure)
