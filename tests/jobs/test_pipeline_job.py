"""`python -m jobs.pipeline` through `main([...])`."""

from __future__ import annotations

import json

import pytest

from jobs.pipeline import main as pipeline
from pipelines.manifest_format import read_manifest
from pipelines.pipeline import STAGES

# The demo's settings, smaller still: 8 images, a few iterations per training stage.
SMALL = {
    "iterations": 4,
    "checkpoint_every": 2,
    "log_every": 2,
    "pseudo_masks": {"scales": [1.0], "flip": False, "report_images": 2},
    "retrain": {"iterations": 4, "batch_size": 4, "crop_size": 96, "short_side": 96},
}


@pytest.mark.slow
def test_pipeline_demo_chain(tmp_path, capsys, ray_session) -> None:
    """The README's main job on a very small demo: every stage, the summary and the table."""
    out = tmp_path / "demo"
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    args = ["--demo", "--num-images", "8", "--output", str(out), "--config", str(config)]
    assert pipeline(args) == 0
    printed = capsys.readouterr().out
    for row in ("CAM argmax", "CRF seeds", "pseudo masks", "retrained model"):
        assert row in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("cam_argmax", "crf_seeds", "pseudo_masks", "retrained"):
        assert summary[key] is not None and 0 <= summary[key] <= 1, (key, summary)
    for stage in STAGES:
        assert (out / stage / "_SUCCESS").exists(), stage
    masks = read_manifest(str(out / "pseudo_masks"))
    train_ids = (out / "data-n8-s0-240x320" / "train.txt").read_text().split()
    assert masks.counts["output"] == len(train_ids)
    assert (out / "pseudo_masks" / "report" / "index.html").exists()
    assert summary["report"].endswith("pseudo_masks/report/index.html")

    # a second run reuses every stage
    assert pipeline(args) == 0
    second = capsys.readouterr().out
    assert second.count("nothing to do") >= len(STAGES) - 1, second

    # a changed pseudo-mask setting re-runs that stage and everything after it, not before
    SMALL["pseudo_masks"]["flip"] = True
    config.write_text(json.dumps(SMALL))
    assert pipeline(args) == 0
    third = capsys.readouterr().out
    assert "pseudo_masks: config or inputs changed" in third
    assert "retrain: config or inputs changed" in third
    assert read_manifest(str(out / "pseudo_masks")).config != masks.config
    assert read_manifest(str(out / "train")).sha256 == read_manifest(str(out / "train")).sha256


def test_num_images_needs_demo(tmp_path) -> None:
    assert pipeline(["--input", str(tmp_path), "--output", str(tmp_path), "--num-images", "3"]) == 2
