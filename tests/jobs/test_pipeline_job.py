"""`python -m jobs.pipeline` through `main([...])`."""

from __future__ import annotations

import json

import pytest

from jobs.pipeline import main as pipeline


@pytest.mark.slow
def test_pipeline_demo_chain(tmp_path, capsys, ray_session) -> None:
    """The README's main job on a very small demo: ingest → refine → train + summary."""
    out = tmp_path / "demo"
    args = ["--demo", "--num-images", "8", "--iterations", "4", "--output", str(out)]
    assert pipeline(args) == 0
    printed = capsys.readouterr().out
    assert "CAM argmax" in printed and "CRF seeds" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["cam_argmax"] <= 1 and 0 <= summary["crf_seeds"] <= 1
    for stage in ("ingest", "refine", "train"):
        assert (out / stage / "_SUCCESS").exists()
    # a second run reuses every stage
    assert pipeline(args) == 0
    assert "nothing to do" in capsys.readouterr().out
