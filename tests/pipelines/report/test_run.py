"""Sections of the run report from hand-made metrics (escaping, unused classes hidden, the
change per class highlighted, missing sources named), and the stage reports of a small run."""

from __future__ import annotations

import json
import re

import pytest

from pipelines.io.storage import resolve
from pipelines.report.run import (
    confusion_section,
    curves_section,
    per_class_section,
    write_stage_report,
)
from tests.conftest import DemoChain


def test_per_class_table_hides_unused_ids_escapes_names_and_marks_changes() -> None:
    seeds = {"background": 0.9, "<b>cat</b>": 0.5, "unused_12": None, "dog": 0.6}
    masks = {"background": 0.95, "<b>cat</b>": 0.4, "unused_12": None, "dog": 0.6}
    page = per_class_section([("seeds (train)", seeds), ("pseudo masks (train)", masks)])
    assert "unused_12" not in page
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    assert '<td class="num up">+5.0</td>' in page  # background
    assert '<td class="num down">-10.0</td>' in page  # the cat
    assert '<td class="num ">+0.0</td>' in page  # the dog, unchanged
    assert "3 classes with a value" in page


def test_missing_sources_are_named_not_fatal() -> None:
    files: dict[str, bytes] = {}
    assert "no metrics history" in curves_section({"train": None, "retrain": []}, files)
    assert "No confusion matrix" in confusion_section(None, files)
    assert files == {}
    assert "No per-class metrics" in per_class_section([])


@pytest.mark.slow
def test_stage_reports_show_the_sections_of_their_stage(demo_chain: DemoChain) -> None:
    out = demo_chain.output
    pages = {}
    for stage in ("train", "retrain", "evaluate"):
        uri = write_stage_report(resolve(str(out / stage)))
        assert uri == (out / stage / "report" / "index.html").as_uri()
        pages[stage] = (out / stage / "report" / "index.html").read_text()
        for src in re.findall(r'src="([^"]+)"', pages[stage]):
            assert (out / stage / "report" / src).stat().st_size > 0, (stage, src)
    assert write_stage_report(resolve(str(out / "pseudo_masks"))) is None  # it has its own
    headings = {s: re.findall(r"<h2>([^<(]+)", page) for s, page in pages.items()}
    assert headings["train"] == ["Training curves", "The run"]
    assert "curves-train.png" in pages["train"] and "curves-retrain" not in pages["train"]
    assert headings["retrain"] == ["Summary ", "Per-class IoU", "Training curves", "The run"]
    assert "retrained model" in pages["retrain"] and "CRF seeds" not in pages["retrain"]
    assert headings["evaluate"] == [
        "Summary ", "Per-class IoU", "Confusion of the pseudo masks", "Images", "The run"
    ]  # fmt: skip
    # The ground truth is the refine output: its CAM and seed columns are there too, on the
    # split the pseudo masks were made for.
    assert "train split" in pages["evaluate"] and "all splits" not in pages["evaluate"]
    for label in ("CAM argmax", "CRF seeds", "pseudo masks", "pseudo masks - seeds"):
        assert label in pages["evaluate"], label
    summary = json.loads((out / "summary.json").read_text())
    assert f"{100 * summary['pseudo_masks']:.1f}" in pages["evaluate"]
    assert "Wall time of the whole chain" not in pages["evaluate"]
