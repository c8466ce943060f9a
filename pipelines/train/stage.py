"""The train stage driver: refine shards → WeakCLIP on Ray Train → `model.pt` + metrics.

Reads the input (a refine output) through its manifest, starts a `TorchTrainer` whose workers
run `pipelines.train.loop.train_loop_per_worker` on Ray Data shards (`pipelines.train.data`),
checkpoints through `ray.train.report` to `<output>/checkpoints/` (s3:// included: the output
location's pyarrow filesystem is Ray Train's storage filesystem), and at the end writes
`<output>/model.pt` (`pipelines.train.export.export_model`), `<output>/metrics.jsonl`, the
manifest and `_SUCCESS` (`pipelines.io.manifest`).

Re-running (docs/CONTRACTS.md; the rules live in `pipelines.training.run`, shared with retrain): the
run's fingerprint is the model config without `train.iterations`, the class names, the CLIP
weights (source and SHA-256) and the input manifest digest. Same fingerprint and finished with
the same iterations: nothing to do. A different fingerprint: refused unless `overwrite`. An
interrupted run, or a finished one asked for more iterations, continues only with `resume`
(Ray Train V2 restores the latest checkpoint when a trainer is re-created with the same
storage path and name); without it the job refuses rather than silently continuing or starting
over.

Resources: one GPU per worker when the cluster has GPUs (NCCL), else gloo on fractional CPUs
(`cpus_per_worker`, 0.5 by default) so that Ray Data keeps CPUs for decoding and augmentation
(docs/ARCHITECTURE.md, "Resources"). The global batch is split evenly over the workers; a worker
whose share is larger than `micro_batch_size` accumulates gradients.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from pipelines.io import manifest as mf
from pipelines.io.storage import Location, StorageOptions, resolve, upload_file
from pipelines.io.storage import write_bytes_atomic as _write_atomic
from pipelines.train import export
from pipelines.training.run import (
    CHECKPOINTS,
    FAIL_ENV,
    FAIL_MARKER_ENV,
    RUN_NAME,
    TrainRefused,
    epochs_needed,
    failure_injection,
    fit,
    latest_checkpoint_iteration,
    open_run,
    sha256_of,
    use_gpu,
)
from weakclip.config import WeakCLIPConfig, to_dict

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainJobConfig:
    """What a training run needs besides the model config."""

    input: str  # refine output URI
    output: str  # this stage's output URI
    model: WeakCLIPConfig  # model + loss + train settings (iterations, batch size, lr, ...)
    num_workers: int = 2  # Ray Train workers
    micro_batch_size: int | None = None  # per-worker micro-batch; None = the worker's share
    clip_weights: str | None = None  # CLIP weights URI; None = random init (tests, demos)
    resume: bool = False  # continue from the last checkpoint
    overwrite: bool = False  # replace another run's outputs
    checkpoint_every: int = 1000  # iterations between checkpoints (and the last one)
    log_every: int = 50  # iterations between metrics rows (and the last one)
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    cpus_per_worker: float = 0.5  # CPU workers (and the CPU share of GPU workers)
    num_cpus_per_task: float = 0.5  # Ray Data read/augment tasks
    crf_processes: int | None = None  # boundary-CRF pool size per worker; None = auto
    absent_tolerance: float | None = None  # see weakclip.crf.boundary_crf_target
    storage: StorageOptions = StorageOptions()

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        batch = self.model.train.batch_size
        if batch % self.num_workers:
            raise ValueError(
                f"batch_size={batch} (global) must be a multiple of num_workers={self.num_workers}"
            )
        share = batch // self.num_workers
        if self.micro_batch_size is not None and (
            self.micro_batch_size < 1 or share % self.micro_batch_size
        ):
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} must divide the per-worker batch "
                f"{share} (batch_size / num_workers)"
            )
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise ValueError(
                f"max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}"
            )
        if self.cpus_per_worker <= 0 or self.num_cpus_per_task <= 0:
            raise ValueError("cpus_per_worker and num_cpus_per_task must be positive")
        if self.crf_processes is not None and self.crf_processes < 0:
            raise ValueError(f"crf_processes must be >= 0, got {self.crf_processes}")

    @property
    def per_worker_batch(self) -> int:
        return self.model.train.batch_size // self.num_workers

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.per_worker_batch


@dataclass(frozen=True)
class TrainResult:
    """What a run did."""

    manifest: mf.Manifest
    start_iteration: int  # 0 for a fresh run, the restored iteration on resume
    iterations: int
    skipped: bool = False  # nothing to do (already complete)


def run_signature(
    model: WeakCLIPConfig, class_names: list[str], clip_uri: str | None, clip_sha256: str | None
) -> dict[str, Any]:
    """What a resume must not change: everything but `train.iterations` (JSON-normalised)."""
    model_dict = to_dict(model)
    del model_dict["train"]["iterations"]
    signature = {
        "model": model_dict,
        "class_names": list(class_names),
        "clip_weights": {"source": clip_uri, "sha256": clip_sha256},
    }
    return json.loads(json.dumps(signature))


def run_train(config: TrainJobConfig, *, log: Any = print) -> TrainResult:
    """Runs (or resumes, or skips) the train stage. See the module docstring.

    Raises:
        TrainRefused: an interrupted or finished run and options that do not say what to do.
        manifest.StageConflictError: the output holds a different run (and not `overwrite`).
        ValueError: bad input (not a refine output, no training rows).
    """
    from pipelines.train.loop import train_loop_per_worker

    output = resolve(config.output, config.storage)
    input_manifest, files = _read_input(config)
    class_names = list(input_manifest.class_names)
    clip = _Clip.resolve(config)
    signature = run_signature(config.model, class_names, clip.uri, clip.sha256)
    iterations = config.model.train.iterations
    run = open_run(
        output,
        stage="train",
        signature=signature,
        inputs=[input_manifest.input_ref()],
        iterations=iterations,
        resume=config.resume,
        overwrite=config.overwrite,
        log=log,
    )
    stage, start_iteration = run.stage, run.start_iteration
    if run.skipped:
        assert stage.manifest is not None
        return TrainResult(stage.manifest, start_iteration, iterations, skipped=True)

    gpu = use_gpu(config.use_gpu)
    rows, dataset = _dataset(config, files, len(class_names), start_iteration)
    started = time.perf_counter()
    checkpoint = fit(
        train_loop_per_worker,
        _loop_config(config, class_names, clip, signature, gpu, output),
        output=output,
        num_workers=config.num_workers,
        gpu=gpu,
        cpus_per_worker=config.cpus_per_worker,
        max_failures=config.max_failures,
        datasets={"train": dataset},
    )
    seconds = time.perf_counter() - started
    manifest = _finish(config, stage, output, checkpoint, clip, input_manifest, rows, seconds)
    return TrainResult(manifest, start_iteration, iterations)


def _read_input(config: TrainJobConfig) -> tuple[mf.Manifest, list[Location]]:
    """The input refine manifest and the shards it lists.

    Raises:
        ValueError: not a refine output, or no shards listed.
    """
    source = resolve(config.input, config.storage)
    input_manifest = mf.read_manifest(source)
    if input_manifest.stage != "refine":
        raise ValueError(f"--input must be a refine output, {source.uri} is {input_manifest.stage}")
    files = [source.child(entry.path) for entry in input_manifest.entries("shards/")]
    if not files:
        raise ValueError(f"{source.uri}: the manifest lists no shards/")
    return input_manifest, files


@dataclass(frozen=True)
class _Clip:
    """The CLIP weights a run starts from (all None: random initialisation)."""

    location: Location | None
    sha256: str | None
    uri: str | None

    @classmethod
    def resolve(cls, config: TrainJobConfig) -> _Clip:
        if not config.clip_weights:
            return cls(None, None, None)
        location = resolve(config.clip_weights, config.storage)
        return cls(location, sha256_of(location), location.uri)


def _dataset(
    config: TrainJobConfig, files: list[Location], num_classes: int, start_iteration: int
) -> tuple[int, Any]:
    """The training rows and the Ray Data pipeline of the epochs still to run."""
    from pipelines.train import data as train_data

    rows, train_only = train_data.count_training_rows(files)
    iterations, batch_size = config.model.train.iterations, config.model.train.batch_size
    epochs = epochs_needed(
        rows=rows, batch_size=batch_size, start_iteration=start_iteration, iterations=iterations
    )
    dataset = train_data.build_train_dataset(
        files,
        model_config=config.model,
        num_classes=num_classes,
        train_only=train_only,
        start_epoch=(start_iteration * batch_size) // rows,
        epochs=epochs,
        num_cpus_per_task=config.num_cpus_per_task,
    )
    return rows, dataset


def _loop_config(
    config: TrainJobConfig,
    class_names: list[str],
    clip: _Clip,
    signature: dict[str, Any],
    gpu: bool,
    output: Location,
) -> dict[str, Any]:
    """What every worker's `train_loop_per_worker` receives."""
    crf_processes = config.crf_processes
    if crf_processes is None:
        crf_processes = min(config.micro_batch, 4) if gpu else 1
    return {
        "model_config": to_dict(config.model),
        "class_names": class_names,
        "clip_weights": clip.location,
        "clip_uri": clip.uri,
        "clip_sha256": clip.sha256,
        "signature": signature,
        "micro_batch_size": config.micro_batch,
        "accumulation_steps": config.per_worker_batch // config.micro_batch,
        "checkpoint_every": config.checkpoint_every,
        "log_every": config.log_every,
        "crf_processes": crf_processes,
        "absent_tolerance": config.absent_tolerance,
        "torch_threads": None if gpu else max(1, int(config.cpus_per_worker)),
        **failure_injection(output),
    }


def _finish(
    config: TrainJobConfig,
    stage: mf.StageOutput,
    output: Location,
    checkpoint: Any,
    clip: _Clip,
    input_manifest: mf.Manifest,
    rows: int,
    seconds: float,
) -> mf.Manifest:
    """Exports `model.pt` and `metrics.jsonl` from the last checkpoint, then commits."""
    class_names = list(input_manifest.class_names)
    from pipelines.train.loop import fetch_clip_weights
    from pipelines.training import checkpoint as ckpt

    iterations = config.model.train.iterations
    with checkpoint.as_directory() as directory:
        meta = ckpt.read_meta(directory)
        if meta["iteration"] != iterations:
            raise RuntimeError(
                f"the last checkpoint is at iteration {meta['iteration']}, not {iterations}"
            )
        history = ckpt.read_metrics(directory)
        clip_path = None
        if ckpt.read_clip_state(directory) is None:
            clip_path = fetch_clip_weights(clip.location, clip.sha256)
        model = export.load_checkpoint_model(directory, clip_weights=clip_path)
    with tempfile.TemporaryDirectory(prefix="weakclip-export-") as tmp:
        local = os.path.join(tmp, MODEL_FILE)
        export.export_model(
            local,
            model=model,
            config=config.model,
            class_names=class_names,
            clip_source=meta["clip_weights"]["source"],
            clip_sha256=meta["clip_weights"]["sha256"],
            iteration=iterations,
        )
        model_bytes = upload_file(output, MODEL_FILE, local)
    metrics_data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history).encode()
    _write_atomic(output, METRICS_FILE, metrics_data)
    last = history[-1] if history else {}
    return stage.commit(
        files=[
            mf.FileEntry(path=MODEL_FILE, rows=None, bytes=model_bytes),
            mf.FileEntry(path=METRICS_FILE, rows=len(history), bytes=len(metrics_data)),
        ],
        counts={
            "input": rows,
            "output": 1,
            "quarantined": 0,
            "iterations": iterations,
            "images_seen": iterations * config.model.train.batch_size,
        },
        class_names=class_names,
        class_space=input_manifest.class_space,
        metrics={k: v for k, v in last.items() if k.startswith("loss")},
        extra={
            "iterations": iterations,
            "num_workers": config.num_workers,
            "clip_weights": meta["clip_weights"],
            "wall_seconds_last_attempt": round(seconds, 3),
        },
    )


__all__ = [
    "CHECKPOINTS",
    "FAIL_ENV",
    "FAIL_MARKER_ENV",
    "RUN_NAME",
    "TrainJobConfig",
    "TrainRefused",
    "TrainResult",
    "latest_checkpoint_iteration",
    "run_signature",
    "run_train",
]
