"""Driver-side pieces every Ray Train stage of this project shares (train and retrain).

- `open_run`: the re-running rules of docs/CONTRACTS.md for a training output. The run's
  fingerprint (`signature`) leaves out the iteration count. Same fingerprint and finished
  with the same iterations: nothing to do. A different fingerprint: refused unless
  `overwrite` (`manifest.StageConflictError`). An interrupted run, or a finished one asked for
  more iterations, continues only with `resume` (Ray Train V2 restores the latest checkpoint
  when a trainer is re-created with the same storage path and name); without it the stage
  refuses (`TrainRefused`) rather than silently continuing or starting over.
- `fit`: a `TorchTrainer` with one GPU per worker when the cluster has GPUs (NCCL), else gloo
  on fractional CPUs so that Ray Data keeps CPUs for decoding and augmentation
  (docs/ARCHITECTURE.md, "Resources"); checkpoints under `<output>/checkpoints/run/` through the
  output location's pyarrow filesystem (s3:// included); `FailureConfig` restarts from the last
  checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.io import manifest as mf
from pipelines.io.storage import Location

RUN_NAME = "run"  # Ray Train experiment name under <output>/checkpoints/
CHECKPOINTS = "checkpoints"
FAIL_ENV = "WEAKCLIP_TEST_FAIL_AT_ITERATION"  # test-only failure injection
FAIL_MARKER_ENV = "WEAKCLIP_TEST_FAIL_MARKER"


class TrainRefused(RuntimeError):
    """The output directory's state and the options disagree (message says what to do)."""


@dataclass(frozen=True)
class RunStart:
    """Where a training run starts: its output and first iteration, or nothing to do."""

    stage: mf.StageOutput
    start_iteration: int  # 0 for a fresh run, the restored iteration on resume
    skipped: bool = False  # complete with the same fingerprint and iterations


def sha256_of(location: Location) -> str:
    """Hex SHA-256 of one stored file."""
    digest = hashlib.sha256()
    with location.fs.open(location.path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def latest_checkpoint_iteration(output: Location) -> int | None:
    """Iteration of the latest checkpoint Ray Train would restore, or None."""
    from ray.train import Result

    run = output.child(CHECKPOINTS, RUN_NAME)
    if not run.fs.exists(run.join("checkpoint_manager_snapshot.json")):
        return None
    try:
        result = Result.from_path(run.path, storage_filesystem=output.pyarrow_fs())
    except RuntimeError:
        return None
    if result.checkpoint is None:
        return None
    metrics = result.metrics or {}
    iteration = metrics.get("iteration")
    return int(iteration) if isinstance(iteration, int) else None


def epochs_needed(*, rows: int, batch_size: int, start_iteration: int, iterations: int) -> int:
    """Epochs of data a run from `start_iteration` to `iterations` consumes, plus one spare.

    The spare covers rows dropped to keep the workers' shards equal and partial last batches.
    """
    if rows <= 0:
        raise ValueError("the input has no training rows")
    images = (iterations - start_iteration) * batch_size
    return max(1, math.ceil(images / rows)) + 1


def use_gpu(requested: bool | None) -> bool:
    """`requested`, or (None) whether the connected cluster has GPUs."""
    import ray

    if requested is not None:
        return requested
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def open_run(
    output: Location,
    *,
    stage: str,
    signature: Mapping[str, Any],
    inputs: Sequence[mf.InputRef],
    iterations: int,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], Any],
) -> RunStart:
    """Applies the re-running rules (module docstring) to a training output.

    A finished run's iteration count is read from its manifest's `iterations` key.

    Raises:
        TrainRefused: an interrupted or finished run and options that do not say what to do.
        manifest.StageConflictError: the output holds a different run (and not `overwrite`).
    """
    out = mf.StageOutput.open(
        output, stage=stage, config=signature, inputs=inputs, overwrite=overwrite
    )
    if out.state is mf.StageState.DONE:
        assert out.manifest is not None
        done = int(out.manifest.extra.get("iterations", -1))
        if done == iterations:
            log(out.done_message())
            return RunStart(out, done, skipped=True)
        if not resume or iterations < done:
            raise TrainRefused(
                f"{output.uri} holds a finished run of {done} iterations, not {iterations}: "
                "pass --resume to extend it to more iterations, or --overwrite to start over"
            )
        # Extending a finished run: it is no longer a result until the new commit.
        for name in (mf.SUCCESS, mf.MANIFEST):
            output.fs.rm(output.join(name))
        out = mf.StageOutput.open(output, stage=stage, config=signature, inputs=inputs)
    start_iteration = latest_checkpoint_iteration(output) or 0
    if start_iteration and not resume:
        raise TrainRefused(
            f"{output.uri} holds an interrupted run with a checkpoint at iteration "
            f"{start_iteration}: pass --resume to continue it, or --overwrite to start over"
        )
    if start_iteration > iterations:
        raise TrainRefused(
            f"the last checkpoint is at iteration {start_iteration}, beyond --iterations "
            f"{iterations}"
        )
    if start_iteration:
        log(f"resumed from iteration {start_iteration}")
    elif resume:
        log("no checkpoint to resume from: starting at iteration 0")
    return RunStart(out, start_iteration)


def failure_injection(output: Location) -> dict[str, Any]:
    """The test-only failure switch's loop-config entries (`worker.maybe_fail`)."""
    fail_at = os.environ.get(FAIL_ENV)
    return {
        "fail_at_iteration": int(fail_at) if fail_at else None,
        "fail_marker": os.environ.get(FAIL_MARKER_ENV)
        or os.path.join(
            tempfile.gettempdir(),
            "weakclip-fail-" + hashlib.sha256(output.uri.encode()).hexdigest()[:16],
        ),
    }


def fit(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    output: Location,
    num_workers: int,
    gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    datasets: Mapping[str, Any],
) -> Any:
    """Runs `loop` on a `TorchTrainer` (module docstring) and returns the last checkpoint.

    Raises:
        RuntimeError: training finished without a checkpoint.
    """
    import ray.train
    import ray.train.torch

    trainer = ray.train.torch.TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=output.join(CHECKPOINTS),
            storage_filesystem=output.pyarrow_fs(),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=dict(datasets),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result.checkpoint


__all__ = [
    "CHECKPOINTS",
    "FAIL_ENV",
    "FAIL_MARKER_ENV",
    "RUN_NAME",
    "RunStart",
    "TrainRefused",
    "failure_injection",
    "fit",
    "latest_checkpoint_iteration",
    "open_run",
    "sha256_of",
    "use_gpu",
]
