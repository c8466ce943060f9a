"""`python -m jobs.pipeline` through `main([...])`."""

from __future__ import annotations

import json

import pytest

from jobs.pipeline import main as pipeline
from pipelines.io.manifest_format import read_manifest
from pipelines.pipeline import STAGES
from tests.conftest import SMALL_DEMO, DemoChain


@pytest.mark.slow
def test_pipeline_demo_chain(demo_chain: DemoChain, capsys) -> None:
    """The README's main job on a very small demo: every stage, the summary and the table."""
    out, args = demo_chain.output, list(demo_chain.args)
    for row in ("CAM argmax", "CRF seeds", "pseudo masks", "retrained model"):
        assert row in demo_chain.printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("cam_argmax", "crf_seeds", "pseudo_masks", "retrained"):
        assert summary[key] is not None and 0 <= summary[key] <= 1, (key, summary)
    for stage in STAGES:
        assert (out / stage / "_SUCCESS").exists(), stage
    masks = read_manifest(str(out / "pseudo_masks"))
    train_ids = (out / "data-n8-s0-240x320" / "train.txt").read_text().split()
    assert masks.counts["output"] == len(train_ids)
    assert (out / "pseudo_masks" / "report" / "index.html").exists()
    assert summary["report"] == (out / "report" / "index.html").as_uri()
    assert (out / "report" / "index.html").exists()
    for stage in ("train", "retrain"):  # the tensorboard extra is part of the test extra
        assert list((out / stage / "tensorboard").glob("events.out.tfevents.*")), stage

    # a second run reuses every stage
    assert pipeline(args) == 0
    second = capsys.readouterr().out
    assert second.count("nothing to do") >= len(STAGES) - 1, second

    # a changed pseudo-mask setting re-runs that stage and everything after it, not before
    changed = {**SMALL_DEMO, "pseudo_masks": {**SMALL_DEMO["pseudo_masks"], "flip": True}}
    demo_chain.config.write_text(json.dumps(changed))
    try:
        assert pipeline(args) == 0
    finally:
        demo_chain.config.write_text(json.dumps(SMALL_DEMO))
    third = capsys.readouterr().out
    assert "pseudo_masks: config or inputs changed" in third
    assert "retrain: config or inputs changed" in third
    assert read_manifest(str(out / "pseudo_masks")).config != masks.config
    assert read_manifest(str(out / "train")).sha256 == read_manifest(str(out / "train")).sha256


def test_num_images_needs_demo(tmp_path) -> None:
    assert pipeline(["--input", str(tmp_path), "--output", str(tmp_path), "--num-images", "3"]) == 2


def test_demo_settings_apply_the_demo_config_to_any_input(tmp_path, monkeypatch) -> None:
    import jobs.pipeline as job
    from pipelines.pipeline import DEMO_CONFIG

    seen = {}
    monkeypatch.setattr("pipelines.cli.init_ray", lambda args: None)
    monkeypatch.setattr(job, "run_pipeline", lambda *a, **k: seen.update(args=a, kwargs=k))
    base = ["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out")]
    assert pipeline([*base, "--demo-settings", "--iterations", "7"]) == 0
    input_uri, _, config = seen["args"]
    assert input_uri == str(tmp_path / "data") and seen["kwargs"]["demo"] is None
    assert config.model == DEMO_CONFIG["model"] == "tiny"
    assert config.iterations == 7  # flags still override the demo settings
    assert config.lr == DEMO_CONFIG["lr"]
    assert config.retrain.iterations == DEMO_CONFIG["retrain"]["iterations"]
    assert pipeline(base) == 0  # without it: the paper's settings
    assert seen["args"][2].model == "vit-b-16" and seen["args"][2].lr is None
    assert pipeline(["--demo", "--demo-settings"]) == 2
