"""Driver side of every Ray Train stage (train and retrain): options, re-running, trainer, export.

Re-running (docs/CONTRACTS.md, `open_run`): the run's fingerprint (`signature`) leaves out the
iteration count. Same fingerprint and finished with the same iterations: nothing to do. A
different fingerprint: refused unless `overwrite`. An interrupted run, or a finished one asked
for more iterations, continues only with `resume` (Ray Train V2 restores the latest checkpoint
when a trainer is re-created with the same storage path and name); else `TrainRefused`.

`fit`: one GPU per worker when the cluster has GPUs (NCCL), else gloo on fractional CPUs so that
Ray Data keeps CPUs for decoding and augmentation (docs/ARCHITECTURE.md, "Resources");
checkpoints under `<output>/checkpoints/run/` through the output's pyarrow filesystem. A start
or restart waits `resource_wait_s` in all for its workers' resources (Ray Train's start timeout,
`START_ATTEMPTS` tries), then fails with `ResourcesUnavailable`, the checkpoints kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipelines.cli.ray_init import use_gpu
from pipelines.io import manifest as mf
from pipelines.io.storage import (
    Location,
    StorageOptions,
    resolve,
    retry_io,
    upload_file,
    write_bytes_atomic,
)
from pipelines.training import checkpoint as ckpt
from pipelines.training import entry
from pipelines.training.tensorboard import TENSORBOARD_DIR, segments
from weakclip.config import check_fields

RUN_NAME = "run"  # Ray Train experiment name under <output>/checkpoints/
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.pt"
FAIL_ENV = "WEAKCLIP_TEST_FAIL_AT_ITERATION"  # test-only failure injection
FAIL_MARKER_ENV = "WEAKCLIP_TEST_FAIL_MARKER"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_ATTEMPTS = 3  # worker-group starts that may time out, resource_wait_s shared among them


class TrainRefused(RuntimeError):
    """The output directory's state and the options disagree (message says what to do)."""


class ResourcesUnavailable(RuntimeError):
    """The workers' resources were not there within `RunOptions.resource_wait_s` (a node lost
    for good, a cluster too small): the run stopped, its checkpoints kept."""


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a training run is executed (not part of its fingerprint)."""

    num_workers: int = 2  # Ray Train workers
    micro_batch_size: int | None = None  # per-worker micro-batch; None = the worker's share
    resume: bool = False  # continue from the last checkpoint
    overwrite: bool = False  # replace another run's outputs
    checkpoint_every: int = 1000  # iterations between checkpoints (and the last one)
    log_every: int = 50  # iterations between logged rows (and the last one)
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    # seconds a start or restart waits for the workers' resources before training fails
    # (the checkpoints stay; --resume continues); 0 = wait for ever (Ray Train's own default)
    resource_wait_s: float = 600.0
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    cpus_per_worker: float = 0.5  # CPU workers (and the CPU share of GPU workers)
    num_cpus_per_task: float = 0.5  # Ray Data read/augment tasks

    def __post_init__(self) -> None:
        check_fields(self, ">= 1", "num_workers", "checkpoint_every", "log_every")
        check_fields(self, "> 0", "cpus_per_worker", "num_cpus_per_task")
        check_fields(self, ">= 0", "resource_wait_s")
        if self.max_failures < -1:
            raise ValueError(
                f"max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}"
            )


@dataclass(frozen=True)
class RunResult:
    """What a run did."""

    manifest: mf.Manifest
    start_iteration: int  # 0 for a fresh run, the restored iteration on resume
    iterations: int
    skipped: bool = False  # nothing to do (already complete)


@dataclass(frozen=True)
class RunStart:
    """Where a training run starts: its output and first iteration, or nothing to do."""

    stage: mf.StageOutput
    start_iteration: int  # 0 for a fresh run, the restored iteration on resume
    skipped: bool = False  # complete with the same fingerprint and iterations

    def result(self, iterations: int, manifest: mf.Manifest | None = None) -> RunResult:
        """What the run did: `manifest` committed, or (None) nothing to do."""
        manifest = manifest or self.stage.manifest
        assert manifest is not None
        return RunResult(manifest, self.start_iteration, iterations, skipped=self.skipped)


@dataclass(frozen=True)
class Weights:
    """A weights file a run starts from (all None: random initialisation)."""

    location: Location | None = None
    sha256: str | None = None

    @property
    def source(self) -> dict[str, str | None]:
        """`{"source": uri, "sha256": digest}` as signatures and manifests record it."""
        return {"source": self.location.uri if self.location else None, "sha256": self.sha256}

    def fetch(self, what: str) -> str | None:
        """A local copy of the file (None without one), checked against `sha256`. Remote files
        are cached under the temporary directory by digest: a node downloads a file once.

        Raises:
            ValueError: the file's digest is no longer `sha256` (it changed since the run started).
        """
        if self.location is None:
            return None
        path = self.location.path
        if self.location.is_local:
            self._check(path, what)
            return path
        cache = os.path.join(tempfile.gettempdir(), "weakclip-weights-cache")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"{self.sha256}{os.path.splitext(path)[1]}")
        if os.path.exists(path):
            self._check(path, what)
            return path
        # Verify, then move: the cache only ever holds files with the digest in their name.
        partial, source = f"{path}.{os.getpid()}.part", self.location
        try:
            retry_io(
                lambda: source.fs.get_file(source.path, partial), what=f"download {source.uri}"
            )
            self._check(partial, what)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        return path

    def _check(self, path: str, what: str) -> None:
        if self.sha256 is None or self.location is None:
            return
        with open(path, "rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != self.sha256:
                raise ValueError(f"{what} {self.location.uri} changed since the run started")


def resolve_weights(uri: str | None, storage: StorageOptions | None) -> Weights:
    """The weights file `uri` names, with its digest (no file: random initialisation)."""
    if not uri:
        return Weights()
    location = resolve(uri, storage)
    with location.fs.open(location.path, "rb") as handle:
        return Weights(location, hashlib.file_digest(handle, "sha256").hexdigest())


def micro_batching(batch_size: int, options: RunOptions, *, min_micro: int = 1) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) per worker for the global batch.

    Raises:
        ValueError: the batch does not split evenly over the workers and micro-batches.
    """
    workers = options.num_workers
    if batch_size % workers:
        raise ValueError(
            f"batch_size={batch_size} (global) must be a multiple of num_workers={workers}"
        )
    share = batch_size // workers
    micro = options.micro_batch_size or share
    if micro < 1 or share % micro:
        raise ValueError(
            f"micro_batch_size={micro} must divide the per-worker batch {share} "
            "(batch_size / num_workers)"
        )
    if micro < min_micro:
        raise ValueError(
            f"batch_size={batch_size} over {workers} workers gives micro-batches of {micro}: "
            f"BatchNorm needs at least {min_micro} images per worker step"
        )
    return micro, share // micro


def signature(**parts: Any) -> dict[str, Any]:
    """A run signature (what a resume must not change), JSON-normalised."""
    return json.loads(json.dumps(parts))


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
    iteration = (result.metrics or {}).get("iteration")
    return int(iteration) if isinstance(iteration, int) else None


def open_run(
    output: Location,
    stage: str,
    signature: Mapping[str, Any],
    inputs: Sequence[mf.InputRef],
    *,
    iterations: int,
    options: RunOptions,
    log: Callable[[str], Any],
) -> RunStart:
    """Applies the re-running rules (module docstring) to a training output.

    A finished run's iteration count is read from its manifest's `iterations` key.

    Raises:
        TrainRefused: an interrupted or finished run and options that do not say what to do.
        manifest.StageConflictError: the output holds a different run (and not `overwrite`).
    """
    resume = options.resume
    out = mf.StageOutput.open(
        output, stage=stage, config=signature, inputs=inputs, overwrite=options.overwrite
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


def fit(
    loop: Callable[[dict[str, Any]], None],
    entries: Mapping[str, Any],
    *,
    output: Location,
    options: RunOptions,
    batching: tuple[int, int],
    dataset: Any,
) -> tuple[Any, float]:
    """Runs `loop` on a `TorchTrainer` (module docstring): (last checkpoint, seconds it took).

    The loop's config holds `entries`, the (micro-batch, accumulation) `batching`
    (`micro_batching`), the cadence, threads and failure switch.

    Raises:
        RuntimeError: training finished without a checkpoint.
    """
    import ray.train
    import ray.train.torch

    micro, accumulation = batching
    gpu = use_gpu(options.use_gpu)
    fail_at = os.environ.get(FAIL_ENV)
    digest = hashlib.sha256(output.uri.encode()).hexdigest()[:16]
    marker = os.path.join(tempfile.gettempdir(), f"weakclip-fail-{digest}")
    config = {
        "micro_batch_size": micro,
        "accumulation_steps": accumulation,
        "checkpoint_every": options.checkpoint_every,
        "log_every": options.log_every,
        "torch_threads": None if gpu else max(1, int(options.cpus_per_worker)),
        "fail_at_iteration": int(fail_at) if fail_at else None,
        "fail_marker": os.environ.get(FAIL_MARKER_ENV) or marker,
        "tensorboard": output.child(TENSORBOARD_DIR),
        **entries,
    }
    trainer = ray.train.torch.TorchTrainer(
        entry.run_loop,  # the controller unpickles it: a light module (pipelines.training.entry)
        train_loop_config={**config, entry.LOOP_KEY: entry.loop_name(loop)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=output.join(CHECKPOINTS),
            storage_filesystem=output.pyarrow_fs(),
            failure_config=ray.train.FailureConfig(
                max_failures=options.max_failures,
                controller_failure_limit=START_ATTEMPTS - 1 if options.resource_wait_s else -1,
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (worker-group starts, every report) stay in its log
            # files under the Ray session directory; warnings and errors still print
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=_ingest_options()),
    )
    started = time.perf_counter()
    with _start_timeout(options.resource_wait_s / START_ATTEMPTS):
        try:
            result = trainer.fit()
        except ray.train.ControllerError as error:
            if type(error.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
                raise
            raise _resources_unavailable(output, options, gpu) from error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result.checkpoint, time.perf_counter() - started


def _ingest_options() -> Any:
    """Ray Train's default ingest options (`DataConfig.default_ingest_options`: this
    DataContext's limits and order) without naming `exclude_resources`, whose setter warns
    that it is deprecated on every run."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


@contextmanager
def _start_timeout(seconds: float) -> Iterator[None]:
    """Ray Train's worker-group start timeout (an environment variable the driver passes on
    to the controller) set to `seconds` for one `fit`; 0 keeps Ray's own."""
    previous = os.environ.get(START_TIMEOUT_ENV)
    if seconds:
        os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = previous


def _resources_unavailable(
    output: Location, options: RunOptions, gpu: bool
) -> ResourcesUnavailable:
    workers = f"{options.num_workers} workers of {options.cpus_per_worker:g} CPUs"
    if gpu:
        workers += " and 1 GPU"
    iteration = latest_checkpoint_iteration(output)
    kept = (
        f"its checkpoint at iteration {iteration} is kept under {output.join(CHECKPOINTS)}: "
        "run the same command with --resume once the cluster has room"
        if iteration
        else "it had no checkpoint yet: run the same command once the cluster has room"
    )
    return ResourcesUnavailable(
        f"training stopped: the cluster had no room for its {workers} within "
        f"{options.resource_wait_s:g} s (--resource-wait-s; a node lost for good, or a "
        f"cluster too small); {kept}"
    )


@contextmanager
def final_checkpoint(
    checkpoint: Any, iterations: int
) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(local directory, meta, logged rows) of the run's last checkpoint, checked complete.

    Raises:
        RuntimeError: the checkpoint is not at `iterations`.
    """
    with checkpoint.as_directory() as directory:
        meta = ckpt.read_meta(directory)
        if meta["iteration"] != iterations:
            raise RuntimeError(
                f"the last checkpoint is at iteration {meta['iteration']}, not {iterations}"
            )
        yield directory, meta, ckpt.read_metrics(directory)


def commit_run(
    stage: mf.StageOutput,
    *,
    export: Callable[[str], None],
    metrics_file: str,
    metrics_data: bytes,
    metrics_rows: int | None,
    more_files: Sequence[mf.FileEntry] = (),
    **commit: Any,
) -> mf.Manifest:
    """Writes `model.pt` (`export(local path)`) and the metrics file; then commits the output
    with them and the TensorBoard segments rank 0 wrote under `tensorboard/`."""
    output = stage.location
    with tempfile.TemporaryDirectory(prefix="weakclip-export-") as tmp:
        local = os.path.join(tmp, MODEL_FILE)
        export(local)
        model_bytes = upload_file(output, MODEL_FILE, local)
    write_bytes_atomic(output, metrics_file, metrics_data)
    files = [
        mf.FileEntry(path=MODEL_FILE, rows=None, bytes=model_bytes),
        mf.FileEntry(path=metrics_file, rows=metrics_rows, bytes=len(metrics_data)),
        *more_files,
    ]
    for name, size in segments(output.child(TENSORBOARD_DIR)).items():
        files.append(mf.FileEntry(path=f"{TENSORBOARD_DIR}/{name}", rows=None, bytes=size))
    return stage.commit(files=files, **commit)
