"""Visual report: panel strips, deterministic sampling and a page that escapes untrusted text."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines.io.codecs import voc_palette
from pipelines.io.storage import read_bytes, resolve
from pipelines.report.strips import (
    INDEX_FILE,
    PANEL_MAX_HEIGHT,
    TITLE_HEIGHT,
    ReportRow,
    colorize,
    render_row,
    row_file_name,
    sample_ids,
    write_report,
)

CLASSES = ["background", "cat", "dog"]


def _row(image_id: str = "img-1", *, height: int = 40, width: int = 60, **maps) -> ReportRow:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return ReportRow(image_id=image_id, image=image, **maps)


def _labels(height: int = 40, width: int = 60) -> np.ndarray:
    labels = np.zeros((height, width), np.uint8)
    labels[: height // 2, : width // 2] = 1
    labels[height // 2 :, width // 2 :] = 2
    labels[0, 0] = 255
    return labels


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.array(image.convert("RGB"))


def test_sample_ids_is_deterministic_and_order_independent() -> None:
    ids = [f"id{i:03d}" for i in range(100)]
    first = sample_ids(ids, 10, seed=3)
    assert first == sample_ids(list(reversed(ids)), 10, seed=3)
    assert len(first) == 10 and len(set(first)) == 10 and set(first) <= set(ids)
    assert first == sorted(first)
    assert first != sample_ids(ids, 10, seed=4)
    assert first != ids[:10]  # a sample, not the head of the list
    assert sample_ids(["b", "a", "b"], 10) == ["a", "b"]
    assert sample_ids(ids, 0) == []


def test_colorize_uses_the_voc_palette() -> None:
    rgb = colorize(_labels())
    palette = np.array(voc_palette(), np.uint8).reshape(256, 3)
    assert rgb.shape == (40, 60, 3)
    assert tuple(rgb[0, 0]) == tuple(palette[255]) == (224, 224, 192)
    assert tuple(rgb[0, 1]) == tuple(palette[1])
    assert tuple(rgb[-1, -1]) == tuple(palette[2])


def test_render_row_shows_only_present_panels() -> None:
    only_image = _decode(render_row(_row()))
    assert only_image.shape == (40 + TITLE_HEIGHT, 60, 3)
    labels = _labels()
    all_panels = _decode(render_row(_row(cam=labels, seed=labels, mask=labels, gt=labels)))
    assert all_panels.shape[1] == 5 * 60 + 4 * 4
    two = _decode(render_row(_row(gt=labels)))
    assert two.shape[1] == 2 * 60 + 4
    # the GT panel shows class 2's palette colour at its bottom-right corner
    palette = np.array(voc_palette(), np.uint8).reshape(256, 3)
    assert tuple(two[-1, -1]) == tuple(palette[2])
    assert tuple(two[TITLE_HEIGHT, 64]) == tuple(palette[255])


def test_render_row_downscales_large_panels() -> None:
    big = _row(height=1200, width=1600, mask=_labels(1200, 1600))
    strip = _decode(render_row(big))
    assert strip.shape[0] == PANEL_MAX_HEIGHT + TITLE_HEIGHT
    assert strip.shape[1] <= 2 * 480 + 4
    thin = _decode(render_row(_row(height=2, width=5000)))
    assert thin.shape[1] <= 480 and thin.shape[0] >= TITLE_HEIGHT + 1


def test_render_row_refuses_bad_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        render_row(ReportRow("x", np.zeros((4, 4, 3), np.float32)))
    with pytest.raises(ValueError, match="label map"):
        render_row(_row(seed=np.zeros((4, 4, 3), np.uint8)))


def test_row_file_name_is_safe() -> None:
    assert row_file_name(3, "2007_000032") == "0003-2007_000032.png"
    name = row_file_name(0, "../../<script>alert(1)</script>")
    assert "/" not in name and "<" not in name and name.startswith("0000-")


def test_write_report_escapes_untrusted_text(tmp_path) -> None:
    out = resolve(str(tmp_path / "stage"))
    hostile = '<script>alert("id")</script>'
    rows = [_row(hostile, gt=_labels()), _row("plain", mask=_labels())]
    classes = ["background", "<b>cat</b>", "dog"]
    metrics = {"miou": 0.5, "per_class_iou": {"<i>x</i>": 0.25, "dog": None}}
    entries = write_report(out, rows, class_names=classes, title="Report <&>", metrics=metrics)
    paths = [e.path for e in entries]
    assert paths == [
        "report/" + row_file_name(0, hostile),
        "report/0001-plain.png",
        "report/index.html",
    ]
    for entry in entries:
        data = read_bytes(out, entry.path)
        assert len(data) == entry.bytes and entry.rows is None
    _decode(read_bytes(out, entries[0].path))
    page = read_bytes(out, f"report/{INDEX_FILE}").decode()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    assert "<i>x</i>" not in page and "Report &lt;&amp;&gt;" in page
    assert 'src="0001-plain.png"' in page  # relative links
    assert "0.5000" in page and "n/a" in page
    assert "rgb(128,0,0)" in page  # class 1's legend swatch


def test_write_report_without_metrics(tmp_path) -> None:
    out = resolve(str(tmp_path / "stage"))
    entries = write_report(out, [], class_names=CLASSES, title="empty")
    assert [e.path for e in entries] == ["report/index.html"]
    page = read_bytes(out, "report/index.html").decode()
    assert "Metrics" not in page and "Images (0)" in page
    json.dumps([e.__dict__ for e in entries])  # manifest-ready
