"""Losing a whole worker node mid-stage on a real multi-node Ray cluster on this machine
(`tests.reliability.node_loss`: `ray.cluster_utils.Cluster`, a head without task CPUs and two
worker nodes; s3:// input and output on the loopback S3 server): the stage finishes on the
node that is left, every image exactly once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipelines.io.manifest import read_manifest
from pipelines.io.storage import resolve
from tests.pipelines.pseudo_masks.inputs import make_checkpoint
from tests.pipelines.refine.test_stage import synthetic_row, write_ingest_output
from tests.reliability import fault_tools as ft
from tests.reliability.test_faults_refine import check_refine_output

pytestmark = pytest.mark.slow

NUM_ROWS, HEIGHT, WIDTH = 24, 160, 224


def _run(*argv: str) -> dict[str, Any]:
    code, printed = ft.run_job(["tests.reliability.node_loss", *argv], timeout_s=300)
    assert code == 0, printed[-3000:]
    facts = json.loads(printed.strip().splitlines()[-1])
    assert facts["removed"], f"no node was removed: {facts}"
    assert facts["nodes"] == 3 and facts["alive_nodes_at_end"] == 2, facts
    return facts


@pytest.fixture
def ingest_on_s3(s3_bucket: str) -> tuple[str, list[str]]:
    rows = [synthetic_row(i, height=HEIGHT, width=WIDTH) for i in range(NUM_ROWS)]
    loc = resolve(f"{s3_bucket}/nodes/ingest")
    write_ingest_output(loc, rows, rows_per_shard=8, rows_per_group=1)
    return loc.uri, [r["image_id"] for r in rows]


def test_refine_survives_losing_a_worker_node(ingest_on_s3, s3_bucket, reliability) -> None:
    reliability.case(
        kind="fault",
        name="refine: worker node removed mid-stage (multi-node cluster)",
        injected=(
            "a head node and two 1-CPU worker nodes (`ray.cluster_utils.Cluster`), s3:// input "
            f"and output; {NUM_ROWS} units of one row; one worker node removed (raylet, object "
            "store, workers) once the first unit's completion record is on S3"
        ),
        checked=(
            "the removal landed mid-stage; refine commits on the remaining node; every image "
            "exactly once; no torn or temporary file listed"
        ),
    )
    ingest, ids = ingest_on_s3
    output = f"{s3_bucket}/nodes/refine"
    facts = _run("refine", ingest, output)
    assert facts["ok"] and facts["units_done_at_removal"] < NUM_ROWS, facts
    counts = check_refine_output(resolve(output), ids)
    reliability.observe(
        f"node removed at {facts['removed_at_s']} s with {facts['units_done_at_removal']} of "
        f"{NUM_ROWS} units done; refine finished {facts['recovery_s']} s later on the "
        f"remaining node; {counts['rows']} rows once each"
    )


def test_pseudo_masks_survive_losing_a_worker_node(
    ingest_on_s3, s3_bucket, tmp_path, reliability
) -> None:
    reliability.case(
        kind="fault",
        name="pseudo masks: worker node removed mid-stage (multi-node cluster)",
        injected=(
            "as for refine, with two model actors (0.5 CPU each) spread over the worker nodes; "
            "one worker node removed once the first unit's completion record is on S3"
        ),
        checked=(
            "the removal landed mid-stage; the stage commits on the remaining node; every "
            "selected image has exactly one mask and one index row"
        ),
    )
    ingest, ids = ingest_on_s3
    output = f"{s3_bucket}/nodes/pseudo_masks"
    checkpoint = make_checkpoint(str(tmp_path / "model.pt"))
    facts = _run("pseudo_masks", ingest, output, checkpoint)
    manifest = read_manifest(resolve(output))
    selected = manifest.counts["selected"]
    assert facts["ok"] and facts["units_done_at_removal"] < NUM_ROWS, facts
    masks = [f.path for f in manifest.files if f.path.startswith("masks/")]
    assert len(masks) == len(set(masks)) == selected == manifest.counts["output"]
    assert {m.removeprefix("masks/").removesuffix(".png") for m in masks} <= set(ids)
    reliability.observe(
        f"node removed at {facts['removed_at_s']} s with {facts['units_done_at_removal']} of "
        f"{NUM_ROWS} units done; the stage finished {facts['recovery_s']} s later; "
        f"{len(masks)} masks, each once"
    )
