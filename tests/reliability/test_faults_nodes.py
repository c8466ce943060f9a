"""Losing a whole worker node mid-stage on a real multi-node Ray cluster on this machine
(`tests.reliability.node_loss`: `ray.cluster_utils.Cluster`, a head without task CPUs and two
worker nodes; s3:// input and output on the loopback S3 server): a data stage finishes on the
node that is left, every image exactly once; training resumes from its checkpoint once a node
is back, and fails clearly, its checkpoint kept, when it never is."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from pipelines.io.manifest import read_manifest
from pipelines.io.storage import resolve
from pipelines.training.run import latest_checkpoint_iteration
from tests.pipelines.pseudo_masks.inputs import make_checkpoint
from tests.pipelines.refine.test_stage import synthetic_row, write_ingest_output
from tests.pipelines.train.inputs import make_refine_input
from tests.reliability import fault_tools as ft
from tests.reliability import node_loss
from tests.reliability.test_faults_refine import check_refine_output
from tests.s3server import S3Server

pytestmark = pytest.mark.slow

NUM_ROWS, HEIGHT, WIDTH = 24, 160, 224


def _run(*argv: str) -> dict[str, Any]:
    code, printed = ft.run_job(["tests.reliability.node_loss", *argv], timeout_s=300)
    assert code == 0, printed[-3000:]
    lines = printed.strip().splitlines()  # Ray's node logs may follow the driver's line
    facts = json.loads(next(line for line in reversed(lines) if line.startswith('{"')))
    assert facts["removed"], f"no node was removed: {facts}"
    assert facts["nodes"] == 3, facts
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
            "exactly once; no torn or temporary file listed; then `jobs.refine` with a local "
            "--output on the same cluster exits 2 naming --allow-local-output, writing nothing"
        ),
    )
    ingest, ids = ingest_on_s3
    output = f"{s3_bucket}/nodes/refine"
    facts = _run("refine", ingest, output)
    assert facts["alive_nodes_at_end"] == 2
    assert facts["ok"] and facts["units_done_at_removal"] < NUM_ROWS, facts
    counts = check_refine_output(resolve(output), ids)
    local = facts["local_output"]  # a local --output on this 3-node cluster: a usage error
    assert local["rc"] == 2 and "--allow-local-output" in local["error"], local
    assert local["untouched"], local
    reliability.observe(
        f"node removed at {facts['removed_at_s']} s with {facts['units_done_at_removal']} of "
        f"{NUM_ROWS} units done; refine finished {facts['recovery_s']} s later on the "
        f"remaining node; {counts['rows']} rows once each"
    )
    reliability.observe(f"local --output on the cluster: exit 2, {local['error'][:160]}")


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
    assert facts["alive_nodes_at_end"] == 2
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


@pytest.fixture(scope="module")
def train_run(s3_server: S3Server) -> tuple[str, dict[str, Any]]:
    """One driver run for both training cases: (output URI, facts)."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    resolve(f"s3://{bucket}").fs.mkdir(bucket)
    source, output = f"s3://{bucket}/nodes/train-input", f"s3://{bucket}/nodes/train"
    make_refine_input(source, count=8, val=2)
    return output, _run("train", source, output)


def test_train_resumes_from_its_checkpoint_after_losing_a_worker_node(
    train_run, reliability
) -> None:
    reliability.case(
        kind="fault",
        name="train: node of a Ray Train worker removed after a checkpoint (multi-node)",
        injected=(
            "a head node and two 2-CPU worker nodes, one Ray Train worker (1.5 CPUs) on each, "
            "s3:// input and output, 8 iterations with a checkpoint every 4; one worker node "
            f"removed once the first checkpoint is on S3, a new 2-CPU node added "
            f"{node_loss.RESOURCES_BACK_S:.0f} s later"
        ),
        checked=(
            "training restarts from the checkpoint once the new node is there and commits "
            "8 iterations; the metrics rows have no gap and no duplicate; the last checkpoint "
            "is at iteration 8"
        ),
    )
    output, facts = train_run
    out = resolve(output)
    assert facts["manifest_iterations"] == 8 and facts["iterations"] == 8, facts
    assert facts["checkpoints_at_removal"] >= 1
    rows = [json.loads(line) for line in out.fs.cat_file(out.join("metrics.jsonl")).splitlines()]
    assert [r["iteration"] for r in rows] == list(range(2, 9, 2))
    assert latest_checkpoint_iteration(out) == 8
    reliability.observe(
        f"node removed at {facts['removed_at_s']} s after {facts['checkpoints_at_removal']} "
        f"checkpoint(s), a node added at {facts['node_added_at_s']} s; training committed "
        f"{facts['recovery_s']} s after the removal; metrics rows {len(rows)}, no gap or repeat"
    )


def test_train_fails_clearly_when_the_lost_node_never_comes_back(train_run, reliability) -> None:
    reliability.case(
        kind="fault",
        name="train: a Ray Train worker's node lost for good (multi-node)",
        injected=(
            "after the case above, on the same cluster: the new worker node removed for good "
            "(one 2-CPU node left, which cannot hold two 1.5-CPU workers), then the same run "
            f"asked for 12 iterations with --resume and --resource-wait-s {node_loss.GONE_WAIT_S:g}"
        ),
        checked=(
            "the run fails with ResourcesUnavailable naming the wait, the kept checkpoint "
            "(iteration 8) and --resume; nothing is committed; the checkpoint at 8 is still "
            "there and restorable"
        ),
    )
    output, facts = train_run
    gone = facts["gone"]
    error = gone["error"] or ""
    assert error.startswith("ResourcesUnavailable: training stopped"), gone
    assert f"within {node_loss.GONE_WAIT_S:g} s" in error and "--resume" in error, error
    assert "checkpoint at iteration 8 is kept" in error, error
    out = resolve(output)
    assert latest_checkpoint_iteration(out) == 8
    assert not out.fs.exists(out.join("_SUCCESS"))
    reliability.observe(f"the run failed {gone['seconds']} s after it started: {error}")
