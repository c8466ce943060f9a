"""Faults injected into a running training job: a Ray Train worker process killed."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.io import manifest as mf
from pipelines.io.storage import resolve
from pipelines.train import TrainJobConfig, export, run_train
from pipelines.training.run import latest_checkpoint_iteration
from tests.pipelines.train.inputs import make_refine_input
from tests.reliability import fault_tools as ft
from weakclip.config import from_dict, preset

ITERATIONS = 12  # the kill lands after the first checkpoint (4): two more after the restore
CHECKPOINT_EVERY = 4
ROWS = 24  # two epochs of batch 4 x 12 iterations: few dataset passes to plan
# kill -> first new checkpoint: detection, a new worker group, the restore and 4 iterations,
# about as much work as start -> first checkpoint (measured in the run). Before the CRF pool's
# children died with their parent, it took 7.5 minutes on an idle machine.
RECOVERY_FACTOR = 3.0
RECOVERY_SLACK_S = 60.0


def _model():
    return from_dict(
        {
            "clip": {"input_size": 128},
            "loss": {"resolution": 32},
            "train": {"iterations": ITERATIONS, "batch_size": 4, "lr": 1e-3},
        },
        base=preset("tiny"),
    )


def _checkpoint_iterations(run_dir: Path) -> list[int]:
    """Iterations of the checkpoints on disk with a meta.json (written last)."""
    found = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            found.append(int(json.loads(meta.read_text())["iteration"]))
        except (OSError, ValueError, KeyError):
            continue  # being written
    return sorted(found)


class CheckpointWatcher(threading.Thread):
    """Records every checkpoint directory that appears under `run_dir` with its iteration
    (Ray Train keeps only the last two), so a test can tell a run restored from a checkpoint
    (its next checkpoint is beyond the restored one) from one that started over."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True, name="checkpoint-watcher")
        self.run_dir = run_dir
        self.seen: dict[str, int] = {}  # directory name -> iteration
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for meta in self.run_dir.glob("checkpoint_*/meta.json"):
                if meta.parent.name not in self.seen:
                    try:
                        self.seen[meta.parent.name] = int(json.loads(meta.read_text())["iteration"])
                    except (OSError, ValueError, KeyError):
                        continue  # being written
            time.sleep(0.05)

    def stop(self) -> list[tuple[datetime.datetime, int]]:
        """(creation time, iteration) of every checkpoint seen, oldest first. Ray Train names
        a checkpoint directory after its local creation time."""
        self._stop_event.set()
        self.join(timeout=10)
        return sorted(
            (datetime.datetime.strptime(name, "checkpoint_%Y-%m-%d_%H-%M-%S.%f"), iteration)
            for name, iteration in self.seen.items()
        )


@pytest.mark.slow
def test_train_resumes_after_worker_process_killed(
    ray_session: None, tmp_path: Path, reliability
) -> None:
    reliability.case(
        kind="fault",
        name="train: Ray Train worker process killed mid-run",
        injected=(
            f"2 CPU workers, {ITERATIONS} iterations, a checkpoint every {CHECKPOINT_EVERY}; "
            "SIGKILL to the pid of one `ray::RayTrainWorker` actor process of this session "
            "once Ray Train had committed the first checkpoint"
        ),
        checked=(
            "the kill landed before the run ended; the restarted worker group restored the "
            "last committed checkpoint (or a later one) instead of starting over (every checkpoint "
            "written after the kill is beyond it: a watcher records each checkpoint's "
            "iteration as it appears); the run finished every iteration; model.pt loads with "
            "weights_only; metrics.jsonl has each logged iteration once"
        ),
    )
    source = str(tmp_path / "refine")
    make_refine_input(source, count=ROWS, val=0)
    output = tmp_path / "train"
    run_dir = output / "checkpoints" / "run"
    watcher = CheckpointWatcher(run_dir)
    watcher.start()
    out = resolve(str(output))
    # Ray Train commits a checkpoint once the controller has registered every worker's report;
    # a checkpoint directory on storage before that is not yet one to resume from.
    injector = ft.FaultInjector(
        ready=lambda: latest_checkpoint_iteration(out) is not None,
        inject=lambda: ft.kill_first_worker("RayTrainWorker"),
        snapshot=lambda: (
            latest_checkpoint_iteration(out),
            _checkpoint_iterations(run_dir),
            (output / mf.SUCCESS).exists(),
        ),
        poll_s=0.1,
    )
    config = TrainJobConfig(
        input=source,
        output=str(output),
        model=_model(),
        num_workers=2,
        checkpoint_every=CHECKPOINT_EVERY,
        log_every=2,
        max_failures=2,
    )
    started = time.monotonic()
    run_started_wall = datetime.datetime.now()  # checkpoint directories carry local time
    injector.start()
    result = run_train(config)
    seconds = time.monotonic() - started
    injection = injector.stop()
    assert injection.error is None, injection.error
    assert injector.injected.is_set(), f"no training worker was killed: {injection.notes}"
    committed, at_kill, finished_at_kill = injection.snapshot
    reliability.observe(
        f"killed {injection.target} at {injection.at_s:.1f} s; last committed checkpoint then: "
        f"iteration {committed} (checkpoint directories on storage: iterations {at_kill})"
    )
    assert committed is not None and committed in at_kill
    assert not finished_at_kill and max(at_kill) < ITERATIONS, "the kill came after the end"
    assert ft.wait_until_gone([injection.pid], timeout_s=10)

    timeline = watcher.stop()
    after = [iteration for created, iteration in timeline if created > injection.at_wall]
    assert after, f"no checkpoint was written after the kill: {timeline}"
    # Started over: the first new checkpoint would be iteration CHECKPOINT_EVERY again.
    # Restored from iteration R: it is R + CHECKPOINT_EVERY, with R a checkpoint from before.
    restored = after[0] - CHECKPOINT_EVERY
    first_after = min(created for created, _ in timeline if created > injection.at_wall)
    recovery_s = (first_after - injection.at_wall).total_seconds()
    reliability.observe(
        f"first checkpoint after the kill written {recovery_s:.0f} s later (failure detected, "
        "worker group restarted, checkpoint restored, 4 iterations run)"
    )
    # Before the CRF pool's children died with their parent, Ray noticed the dead worker only
    # after its gRPC keepalive timed out (7.5 minutes measured). The limit scales with this
    # machine's speed: the run's own time to its first checkpoint.
    before = [created for created, _ in timeline if created <= injection.at_wall]
    assert before, f"the watcher saw no checkpoint from before the kill: {timeline}"
    first_before = min(before)
    to_first_s = (first_before - run_started_wall).total_seconds()
    limit_s = RECOVERY_FACTOR * to_first_s + RECOVERY_SLACK_S
    reliability.observe(
        f"start -> first checkpoint took {to_first_s:.0f} s; recovery limit {limit_s:.0f} s"
    )
    assert recovery_s < limit_s, f"recovery took {recovery_s:.0f} s (limit {limit_s:.0f} s)"
    assert restored in at_kill and restored >= committed, (timeline, committed, at_kill)
    assert after == list(range(after[0], ITERATIONS + 1, CHECKPOINT_EVERY)), after
    assert result.iterations == ITERATIONS
    manifest = mf.read_manifest(out)
    assert manifest.extra["iterations"] == ITERATIONS
    assert latest_checkpoint_iteration(out) == ITERATIONS
    model = torch.load(output / "model.pt", weights_only=True)
    assert model is not None
    exported = export.load_exported_model(str(output / "model.pt"))
    assert exported is not None
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(2, ITERATIONS + 1, 2))
    reliability.observe(
        f"checkpoints after the kill: iterations {after} (restored from {restored}); the run "
        f"finished {ITERATIONS} iterations in {seconds:.0f} s (kill and restart included); "
        f"model.pt {(output / 'model.pt').stat().st_size} bytes, {len(rows)} metrics rows"
    )


_POOL_SCRIPT = """
import sys, time
from pipelines.train.crf_pool import CRFPool, crf_params
from weakclip.config import CRFConfig
pool = CRFPool(processes=2, params=crf_params(CRFConfig(), prob_floor=1e-4))
print(" ".join(str(p) for p in pool._executor._processes), flush=True)
time.sleep(600)
"""


def test_crf_pool_processes_die_with_a_killed_training_process(tmp_path: Path, reliability) -> None:
    reliability.case(
        kind="fault",
        name="train: CRF pool outliving a killed training process",
        injected=(
            "a process that created the boundary-loss CRF pool (2 forked processes, as every "
            "training worker does) killed with SIGKILL"
        ),
        checked=(
            "the pool's processes exit with it, so no orphan keeps the dead worker's sockets "
            "(raylet, gRPC, gloo) open and Ray sees the worker die at once"
        ),
    )
    tag = ft.new_tag()
    env = ft.job_env(tag)
    proc = subprocess.Popen(
        [sys.executable, "-c", _POOL_SCRIPT],
        cwd=ft.REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        children = [int(p) for p in proc.stdout.readline().split()]
        assert len(children) == 2 and all(ft.is_alive(p) for p in children), children
        assert all(ft.parent_pid(p) == proc.pid for p in children)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its group is left alone
        proc.wait(timeout=10)
        started = time.monotonic()
        gone = ft.wait_until_gone(children, timeout_s=10)
        reliability.observe(
            f"parent pid {proc.pid} killed; its pool processes {children} "
            + (f"exited within {time.monotonic() - started:.2f} s" if gone else "survived")
        )
        assert gone, "CRF pool processes outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        ft.kill_tagged(tag)
