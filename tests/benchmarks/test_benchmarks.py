"""Every benchmark script still imports and parses its options (`--help` exits 0)."""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import benchmarks
from benchmarks.quality import FAMILIES, format_table

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))


def test_every_benchmark_is_found() -> None:
    assert {"quality", "recipe_ablation", "train_step", "pseudo_masks"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_help_exits_0(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_quality_table_shows_the_gain_and_zero_iou_classes() -> None:
    rows = [
        {"family": "camouflage-voc", "cam_argmax": 0.5, "crf_seeds": 0.6, "pseudo_masks": 0.7,
         "retrained": None, "zero_iou_classes": ["dog"], "seconds": 12.0},
    ]  # fmt: skip
    table = format_table(rows).splitlines()
    assert table[1].split() == ["camouflage-voc", "50.0", "60.0", "70.0", "10.0", "-", "12", "dog"]
    assert set(FAMILIES) == {
        "shapes-voc-size",
        "camouflage-voc",
        "camouflage-coco91",
        "colours-voc",
        "colours-coco91",
    }


def test_feature_control_learns_what_its_targets_show(tmp_path) -> None:
    from benchmarks import feature_control
    from tests.pipelines.train.inputs import make_refine_input

    make_refine_input(str(tmp_path / "refine"), count=8, val=2)
    scores = {}
    for iterations in (0, 60):
        out = tmp_path / f"control-{iterations}.json"
        argv = ["--refine", str(tmp_path / "refine"), "--targets", "gt", "--json", str(out)]
        assert feature_control.main([*argv, "--iterations", str(iterations)]) == 0
        scores[iterations] = json.loads(out.read_text())
    assert scores[0]["seeds"] == scores[60]["seeds"]  # the seeds are scored, never trained on
    assert scores[60]["argmax"] > scores[0]["argmax"] + 10  # colour-separable: learnt fast
