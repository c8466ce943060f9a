"""Hostile pseudo-mask outputs (what evaluate and retrain read): every damaged mask is
quarantined with its reason; good images are scored and used unchanged.

The pseudo-mask output is written by `tests.reliability.hostile.write_pseudo_mask_output`: each good
image's mask equals its ground truth, so the good images score an mIoU of exactly 1.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.io import schema
from pipelines.io.codecs import decode_label_map
from pipelines.io.manifest import read_manifest
from pipelines.io.storage import Location, resolve
from pipelines.metrics import confusion_matrix, score_from_confusion
from pipelines.synthetic.dataset import ingest_row
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample
from tests.reliability import hostile
from tests.reliability.hostile_tools import read_parquet_file, read_rows, write_ingest_output

DEFECTS = {f"syn_{i:06d}": kind for i, kind in enumerate(hostile.PSEUDO_MASK_DEFECTS)}
NUM_GOOD = 4
NUM_CLASSES = SYNTHETIC_CLASSES.num_classes


def _inputs(tmp_path: Path) -> tuple[Location, Location, list[str]]:
    """(ingest output with GT, pseudo-mask output with one damaged mask per defect, good ids)."""
    samples = [
        generate_sample(i, seed=7, height=48, width=64) for i in range(len(DEFECTS) + NUM_GOOD)
    ]
    source = resolve(str(tmp_path / "ingest"))
    write_ingest_output(source, [[ingest_row(s, split="train") for s in samples]])
    masks = resolve(str(tmp_path / "pseudo_masks"))
    hostile.write_pseudo_mask_output(
        masks,
        samples,
        source=read_manifest(source).input_ref(),
        class_names=SYNTHETIC_CLASSES.class_names,
        defects=DEFECTS,
    )
    good = [s.image_id for s in samples if s.image_id not in DEFECTS]
    return source, masks, good


@pytest.mark.usefixtures("ray_session")
def test_evaluate_quarantines_every_damaged_mask(tmp_path: Path, capfd, reliability):
    reliability.case(
        kind="input",
        name="evaluate: pseudo-mask output with damaged masks",
        injected=(
            f"a committed pseudo_masks output of {NUM_GOOD} good masks and one mask per defect "
            f"({', '.join(hostile.PSEUDO_MASK_DEFECTS)}); `jobs.evaluate --input MASKS --gt "
            "INGEST --output OUT`, then again with `--max-error-fraction 1`"
        ),
        checked="first exit 1 from the error gate, nothing committed; then exit 0; each damaged "
        "mask has a quarantine row with its reason (a mask with class ids >= K may instead "
        "be scored with those pixels as misses); the mIoU equals "
        "the value recomputed from exactly the scored masks (1.0 for the good ones alone)",
    )
    pytest.importorskip("jobs.evaluate")
    from jobs.evaluate import main

    source, masks, good = _inputs(tmp_path)
    out = resolve(str(tmp_path / "evaluate"))
    argv = ["--input", masks.uri, "--gt", source.uri, "--output", out.uri, "--json"]
    # With the default error gate (1%) so many damaged masks fail the job: nothing written.
    assert main(argv) == 1
    refused = capfd.readouterr().err
    assert "pairs quarantined" in refused and "nothing committed" in refused, refused[-2000:]
    assert not out.fs.exists(out.join("_SUCCESS"))
    status = main([*argv, "--max-error-fraction", "1"])  # resumed with a higher tolerance
    captured = capfd.readouterr()
    assert status == 0, captured.err[-2000:]
    reasons = {r[schema.IMAGE_ID]: r[schema.REASON] for r in read_rows(out, "quarantine/")}
    assert not set(reasons) & set(good), reasons
    # A mask with class ids >= K may be quarantined, or scored with those pixels as misses
    # (evaluate's documented rule for predictions); every other defect must be quarantined.
    out_of_range = next(i for i, kind in DEFECTS.items() if kind == "mask_class_range")
    must = set(DEFECTS) - {out_of_range}
    assert must <= set(reasons), (sorted(must - set(reasons)), reasons)
    scored = list(good) if out_of_range in reasons else [*good, out_of_range]
    expected = _expected_miou(masks, source, scored)
    metrics = json.loads(out.fs.cat_file(out.join("metrics.json")))
    assert abs(metrics["miou"] - expected) < 1e-9, (metrics["miou"], expected)
    manifest = read_manifest(out)
    reliability.observe(
        f"counts {dict(manifest.counts)}; mIoU {metrics['miou']:.6f} = the value recomputed "
        f"from the {len(scored)} scored masks"
    )
    for image_id, kind in DEFECTS.items():
        reliability.observe(
            f"{kind}: {reasons[image_id][:200]}"
            if image_id in reasons
            else f"{kind}: scored, its out-of-range pixels counted as misses"
        )


def _expected_miou(masks: Location, source: Location, image_ids: list[str]) -> float:
    """mIoU of the stored masks of `image_ids` against the source's ground truth."""
    gts = {r[schema.IMAGE_ID]: r[schema.GT] for r in read_rows(source, "shards/")}
    total = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)
    for image_id in image_ids:
        pred = np.asarray(
            Image.open(io.BytesIO(masks.fs.cat_file(masks.join(f"masks/{image_id}.png"))))
        )
        gt = decode_label_map(gts[image_id])
        total += confusion_matrix(pred, gt, NUM_CLASSES)
    return float(score_from_confusion(total).miou)


def test_retrain_plan_quarantines_every_damaged_mask(tmp_path: Path, reliability):
    reliability.case(
        kind="input",
        name="retrain: pseudo-mask output with damaged masks",
        injected=(
            f"the same damaged pseudo_masks output ({', '.join(hostile.PSEUDO_MASK_DEFECTS)}) "
            "through `pipelines.retrain.stage.plan`, the join and mask check `run_retrain` does "
            "before training"
        ),
        checked="every damaged row is quarantined with its reason (and written to the "
        "quarantine table); exactly the good images are planned for training, each once",
    )
    retrain = pytest.importorskip("pipelines.retrain.stage")
    source, masks, good = _inputs(tmp_path)
    out = resolve(str(tmp_path / "retrain"))
    lines: list[str] = []
    plan, entry = retrain.plan(read_manifest(masks), read_manifest(source), out, lines.append)
    assert entry is not None
    stored = {r[schema.IMAGE_ID] for r in read_parquet_file(out, entry.path)}
    assert stored == set(DEFECTS)
    reasons = {image_id: reason for image_id, _, reason in plan.quarantined}
    assert sorted(reasons) == sorted(DEFECTS), reasons
    assert sorted(plan.train) == sorted(good)
    reliability.observe(
        f"{plan.index_rows} index rows: {len(plan.train)} planned for training, "
        f"{len(plan.quarantined)} quarantined"
    )
    for image_id, kind in DEFECTS.items():
        reliability.observe(f"{kind}: {reasons[image_id][:200]}")
