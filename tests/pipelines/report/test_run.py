"""Sections of the run report from hand-made metrics: escaping, unused classes hidden, the
change per class highlighted, missing sources named."""

from __future__ import annotations

from pipelines.report.run import confusion_section, curves_section, per_class_section


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
