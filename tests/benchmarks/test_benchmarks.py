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


def test_cost_model_fits_the_crf_and_reads_the_cluster_file() -> None:
    from benchmarks import cost_model

    truth = (0.01, 6e-7, 2e-7)
    rows = [
        {"height": h, "width": w, "k": k, "crf_s": cost_model.crf_seconds(truth, h * w, k)}
        for h, w in ((100, 120), (300, 400))
        for k in (2, 3, 4)
    ]
    assert cost_model.fit_crf(rows) == pytest.approx(truth, rel=1e-6)
    nodes = cost_model.node_types()
    assert {n["gpus"] > 0 for n in nodes.values()} == {True, False}
    bytes_row = {"height": 10, "width": 10, "image_b": 100.0, "gt_b": 10.0, "cam_plane_b": 50.0}
    voc = cost_model.DATASETS[0]
    plan = cost_model.plan(
        voc, crf_fit=truth, window_s=2.0, bytes_row=bytes_row, nodes=nodes, train_images_per_s=10
    )
    cpu = next(n for n in nodes.values() if n["gpus"] == 0)
    crf = cost_model.crf_seconds(truth, voc.height * voc.width, voc.classes_per_image + 1)
    cores = cpu["cpus"] * cpu["max_workers"]
    assert plan["refine_h"] == pytest.approx(voc.images * crf * 1.12 / cores / 3600)
    scale = voc.height * voc.width / 100
    assert plan["ingest_gb"] == pytest.approx(voc.images * (110 + 50 * 1.5) * scale / 1e9)
