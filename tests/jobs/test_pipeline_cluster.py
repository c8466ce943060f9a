"""End to end on a real Ray cluster: `ray start --head` on loopback, `ray job submit` of
`jobs.pipeline` with s3:// input and output on the loopback S3 server.

The cluster is this test's own (`tests.ray_head`: private temp dir, ports and auth token,
stopped by killing its process tree). No other test attaches to it: the session fixture
`ray_session` starts its own instance with `address="local"`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.io.manifest_format import read_manifest
from pipelines.io.storage import exists, read_bytes, resolve
from tests.proc import tail
from tests.ray_head import Cluster, ray_head, submit_job

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 900  # several times the job's 2 minutes on 2 idle cores
STAGES = ("ingest", "refine", "train", "pseudo_masks", "retrain", "evaluate")
# Smaller than the demo: 12 images (9 train, 3 val) of 96 x 128, a few iterations per stage,
# the tiny model (the default preset, ViT-B/16 at 512, took 420 of this test's 538 s on 2 cores).
E2E_CONFIG = {
    "model": "tiny",
    "iterations": 4,
    "batch_size": 2,
    "checkpoint_every": 2,
    "log_every": 2,
    "pseudo_masks": {"scales": [1.0], "flip": False},
    "retrain": {"iterations": 4, "batch_size": 4, "crop_size": 96, "short_side": 96},
}


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    with ray_head() as cluster:
        yield cluster


@pytest.mark.slow
def test_pipeline_job_submit_on_cluster(ray_cluster: Cluster, s3_bucket: str) -> None:
    """`ray job submit` runs the whole chain from s3:// data to a retrained model on s3://."""
    from jobs.make_synthetic import main as make_synthetic

    data, run = f"{s3_bucket}/data", f"{s3_bucket}/run"
    args = ["--output", data, "--num-images", "12", "--height", "96", "--width", "128"]
    assert make_synthetic([*args, "--val-fraction", "0.25", "--seed", "7"]) == 0
    config = resolve(f"{s3_bucket}/pipeline.json")
    config.fs.pipe_file(config.path, json.dumps(E2E_CONFIG).encode())

    # The job takes about 2 minutes on 2 idle cores; `ray job submit` streams its log, which
    # a time-out prints.
    entrypoint = ["python", "-m", "jobs.pipeline", "--input", data, "--output", run]
    entrypoint += ["--config", config.uri, "--split", "train=train.txt", "--split", "val=val.txt"]
    submit = submit_job(ray_cluster, entrypoint, working_dir=REPO, timeout_s=JOB_TIMEOUT_S)
    log = submit.stdout
    assert submit.returncode == 0, tail(log)
    assert "succeeded" in log, tail(log)

    out = resolve(run)
    for stage in STAGES:
        stage_loc = out.child(stage)
        assert exists(stage_loc, "_SUCCESS"), f"{stage}: no _SUCCESS"
        manifest = read_manifest(stage_loc)
        assert manifest.stage == stage
        for entry in manifest.files:
            assert exists(stage_loc, entry.path), f"{stage}: listed {entry.path} missing"
    assert read_manifest(out.child("pseudo_masks")).counts["output"] == 9

    summary = json.loads(read_bytes(out, "summary.json"))
    print("stage seconds:", summary["seconds"])
    for key in ("cam_argmax", "crf_seeds", "pseudo_masks", "retrained"):
        assert summary[key] is not None and 0.0 <= summary[key] <= 1.0, (key, summary)
    metrics = json.loads(read_bytes(out.child("retrain"), "metrics.json"))
    assert metrics["num_val_images"] == 3 and 0.0 <= metrics["miou"] <= 1.0
    assert "retrained model" in log  # the table was printed in the job's log
