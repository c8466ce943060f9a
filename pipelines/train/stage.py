"""The train stage driver: refine shards → WeakCLIP on Ray Train → `model.pt` + metrics; the
fingerprint is `run_signature` and the input manifest digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.io import manifest as mf
from pipelines.io.storage import StorageOptions, resolve
from pipelines.train import export
from pipelines.training import run as tr
from pipelines.training.run import RunOptions, RunResult, TrainRefused
from weakclip.config import WeakCLIPConfig, check_fields, to_dict

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainJobConfig(RunOptions):
    """What a training run needs: input, output, model config, and how it runs."""

    input: str  # refine output URI
    output: str  # this stage's output URI
    model: WeakCLIPConfig  # model + loss + train settings (iterations, batch size, lr, ...)
    clip_weights: str | None = None  # CLIP weights URI; None = random init (tests, demos)
    crf_processes: int | None = None  # boundary-CRF pool size per worker; None = auto
    absent_tolerance: float | None = None  # see weakclip.crf.boundary_crf_target
    storage: StorageOptions = StorageOptions()

    def __post_init__(self) -> None:
        super().__post_init__()
        tr.micro_batching(self.model.train.batch_size, self)
        check_fields(self, ">= 0", "crf_processes")


def run_signature(
    model: WeakCLIPConfig, class_names: list[str], clip: tr.Weights
) -> dict[str, Any]:
    """What a resume must not change: the model config but `train.iterations`, the class names
    and the CLIP weights (source and SHA-256)."""
    model_dict = to_dict(model)
    del model_dict["train"]["iterations"]
    return tr.signature(model=model_dict, class_names=class_names, clip_weights=clip.source)


def run_train(config: TrainJobConfig, *, log: Any = print) -> RunResult:
    """Runs (or resumes, or skips) the train stage; writes `model.pt` and `metrics.jsonl`.

    Raises:
        TrainRefused: an interrupted or finished run and options that do not say what to do.
        manifest.StageConflictError: the output holds a different run (and not `overwrite`).
        ValueError: bad input (not a refine output, no training rows).
    """
    from pipelines.train import data
    from pipelines.train.loop import train_loop_per_worker

    output = resolve(config.output, config.storage)
    source = resolve(config.input, config.storage)
    input_manifest = mf.read_manifest(source)
    if input_manifest.stage != "refine":
        raise ValueError(f"--input must be a refine output, {source.uri} is {input_manifest.stage}")
    class_names = list(input_manifest.class_names)
    clip = tr.resolve_weights(config.clip_weights, config.storage)
    signature = run_signature(config.model, class_names, clip)
    iterations = config.model.train.iterations
    inputs = [input_manifest.input_ref()]
    run = tr.open_run(
        output, "train", signature, inputs, iterations=iterations, options=config, log=log
    )
    if run.skipped:
        return run.result(iterations)
    rows, dataset = data.train_dataset(
        input_manifest,
        config.model,
        run.start_iteration,
        num_cpus_per_task=config.num_cpus_per_task,
    )
    entries = {
        "model_config": to_dict(config.model),
        "class_names": class_names,
        "clip": clip,
        "signature": signature,
        "crf_processes": config.crf_processes,
        "absent_tolerance": config.absent_tolerance,
    }
    checkpoint, seconds = tr.fit(
        train_loop_per_worker,
        entries,
        output=output,
        options=config,
        batching=tr.micro_batching(config.model.train.batch_size, config),
        dataset=dataset,
    )
    manifest = _export_and_commit(config, run, checkpoint, input_manifest, clip, rows, seconds)
    return run.result(iterations, manifest)


def _export_and_commit(
    config: TrainJobConfig,
    run: tr.RunStart,
    checkpoint: Any,
    input_manifest: mf.Manifest,
    clip: tr.Weights,
    rows: int,
    seconds: float,
) -> mf.Manifest:
    """Exports `model.pt` and `metrics.jsonl` from the last checkpoint, then commits."""
    from pipelines.training import checkpoint as ckpt

    iterations, class_names = config.model.train.iterations, list(input_manifest.class_names)
    with tr.final_checkpoint(checkpoint, iterations) as (directory, meta, history):
        # Without stored CLIP weights, CLIP came from a weights file.
        clip_path = None if ckpt.has_clip_state(directory) else clip.fetch("CLIP weights")
        model = export.load_checkpoint_model(directory, clip_weights=clip_path)
    last = history[-1] if history else {}
    return tr.commit_run(
        run.stage,
        export=lambda path: export.export_model(
            path,
            model=model,
            config=config.model,
            class_names=class_names,
            clip_source=meta["clip_weights"]["source"],
            clip_sha256=meta["clip_weights"]["sha256"],
            iteration=iterations,
        ),
        metrics_file=METRICS_FILE,
        metrics_data=ckpt.jsonl(history).encode(),
        metrics_rows=len(history),
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


__all__ = ["TrainJobConfig", "TrainRefused", "run_signature", "run_train"]
