"""End to end on a real Ray cluster: `ray start --head` on loopback, `ray job submit` of
`jobs.pipeline` with s3:// input and output on the loopback S3 server.

The cluster is this test's own (private temp dir, its own ports and auth token) and is stopped
at the end by killing the process tree `ray start` left behind — never `ray stop`, which would
stop every Ray instance on the machine, the test session's included. No other test attaches to
it: the session fixture `ray_session` starts its own instance with `address="local"`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.io.manifest_format import read_manifest
from pipelines.io.storage import exists, read_bytes, resolve
from tests.proc import run_logged, tail
from tests.s3server import free_port

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


@dataclass(frozen=True)
class Cluster:
    dashboard: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # environment of `ray` CLI calls (auth token, PATH, no RAY_ADDRESS)
    temp_dir: str


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), read from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (parent, cmdline)
    return table


def _stop_cluster(temp_dir: str) -> None:
    """Kills the processes whose command line names `temp_dir`, and all their descendants."""
    table = _process_table()
    tree = {pid for pid, (_, cmdline) in table.items() if temp_dir in cmdline}
    grown = True
    while grown:
        grown = False
        for pid, (parent, _) in table.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in tree):
            time.sleep(0.2)


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="rayE2E-", dir="/tmp")
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",  # Ray 2.60: the head requires this token of every client
        RAY_AUTH_TOKEN_PATH=token_path,
        RAY_USAGE_STATS_ENABLED="0",
    )
    dashboard_port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run(
            [
                ray, "start", "--head",
                "--node-ip-address", "127.0.0.1",
                "--port", str(free_port()),
                "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard_port),
                # The agents' default ports are fixed: another Ray instance on this machine
                # (the test session's) may hold them, and the job agent would never start.
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()),
                "--metrics-export-port", str(free_port()),
                "--ray-client-server-port", str(free_port()),
                "--num-cpus", "2",
                "--object-store-memory", str(512 * 1024 * 1024),
                "--temp-dir", temp_dir,
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            timeout=180,
            capture_output=True,
        )  # fmt: skip
        yield Cluster(f"http://127.0.0.1:{dashboard_port}", env, temp_dir)
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_pipeline_job_submit_on_cluster(ray_cluster: Cluster, s3_bucket: str) -> None:
    """`ray job submit` runs the whole chain from s3:// data to a retrained model on s3://."""
    from jobs.make_synthetic import main as make_synthetic

    data, run = f"{s3_bucket}/data", f"{s3_bucket}/run"
    args = ["--output", data, "--num-images", "12", "--height", "96", "--width", "128"]
    assert make_synthetic([*args, "--val-fraction", "0.25", "--seed", "7"]) == 0
    config = resolve(f"{s3_bucket}/pipeline.json")
    config.fs.pipe_file(config.path, json.dumps(E2E_CONFIG).encode())

    # Right after `ray start` the head's job agent may not be up yet ("No available agent to
    # submit job"): that refusal creates no job, so submitting again is safe.
    deadline = time.monotonic() + 180
    while True:
        # The job takes about 2 minutes on 2 idle cores; `ray job submit` streams its log, which
        # a time-out prints.
        submit = run_logged(
            [
                str(Path(sys.executable).parent / "ray"), "job", "submit",
                "--address", ray_cluster.dashboard,
                "--working-dir", str(REPO),
                "--",
                "python", "-m", "jobs.pipeline",
                "--input", data, "--output", run, "--config", config.uri,
                "--split", "train=train.txt", "--split", "val=val.txt",
            ],
            env=ray_cluster.env,
            timeout_s=JOB_TIMEOUT_S,
            what="ray job submit of jobs.pipeline",
        )  # fmt: skip
        if "No available agent" not in submit.stdout:
            break
        assert time.monotonic() < deadline, "the cluster's job agent never came up"
        time.sleep(5)
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
