"""The retrain stage driver: pseudo masks → a fully supervised DeepLabV3 on Ray Train.

Inputs as `read_inputs` says; unusable masks are quarantined (`quarantine/masks.parquet`). The
fingerprint is `run_signature` and both input digests.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipelines.io import manifest as mf
from pipelines.io.storage import Location, StorageOptions, resolve
from pipelines.metrics import ConfusionAccumulator
from pipelines.retrain import data
from pipelines.retrain.model import ARCHITECTURES, build_model, export_model
from pipelines.training import run as tr
from pipelines.training.augment import AugmentConfig
from pipelines.training.run import RunOptions, RunResult
from weakclip.config import check_fields

METRICS_FILE = "metrics.json"
SOURCE_STAGES = ("ingest", "refine")


@dataclass(frozen=True)
class RetrainConfig:
    """What the retrained network is and how it trains (`--config` fields and flags)."""

    architecture: str = "small"  # small | resnet50 | resnet101 | mobilenet_v3_large
    backbone_weights: str | None = None  # backbone weights URI (.pt/.pth/.safetensors); None=random
    iterations: int = 1000  # optimizer steps in total
    batch_size: int = 8  # global, across all workers
    lr: float = 1e-3  # AdamW peak learning rate
    min_lr: float = 1e-6  # end of the cosine decay
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_iterations: int = 100  # linear warm-up, capped at max_warmup_fraction of the run
    max_warmup_fraction: float = 0.1  # cap for short runs
    crop_size: int = 512  # side of the square training crop
    short_side: int | None = None  # short side at rescale ratio 1; None = crop_size
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random rescale ratio range
    cat_max_ratio: float = 0.75  # a crop's largest class must cover less than this share
    flip_prob: float = 0.5  # horizontal flip probability
    photometric: bool = True  # photometric distortion
    seed: int = 0  # initialisation and augmentation seed

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}")
        check_fields(self, ">= 1", "iterations", "batch_size", "crop_size", "short_side")
        check_fields(self, ">= 0", "weight_decay", "warmup_iterations")
        check_fields(self, "in [0, 1]", "max_warmup_fraction")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"lr must be > 0 and min_lr in [0, lr], got {self.lr}, {self.min_lr}")
        self.augment()  # AugmentConfig names a bad ratio_range, cat_max_ratio or flip_prob

    @property
    def effective_warmup_iterations(self) -> int:
        return min(self.warmup_iterations, int(self.max_warmup_fraction * self.iterations))

    @property
    def effective_min_lr(self) -> float:  # as WeakCLIP's TrainConfig (`Schedule.of` reads both)
        return self.min_lr

    def augment(self) -> AugmentConfig:
        """The training augmentation (`pipelines.training.augment`) these settings describe."""
        short = self.short_side or self.crop_size
        return AugmentConfig.of(self, crop_size=self.crop_size, short_side=short)


@dataclass(frozen=True, kw_only=True)
class RetrainOptions(RunOptions):
    """How a retraining run is executed (not part of its fingerprint)."""

    checkpoint_every: int = 500  # iterations between checkpoints (and the last one)
    wait_timeout_s: float = 600.0  # how long to wait for the input's _SUCCESS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, ">= 0", "wait_timeout_s")


def micro_batching(config: RetrainConfig, options: RetrainOptions) -> tuple[int, int]:
    """`pipelines.training.run.micro_batching` with at least 2 images per micro-batch
    (BatchNorm, in DeepLabV3's image-pooling branch above all, cannot train on one sample)."""
    return tr.micro_batching(config.batch_size, options, min_micro=2)


def run_signature(
    config: RetrainConfig, class_names: Sequence[str], weights: tr.Weights
) -> dict[str, Any]:
    """What a resume must not change: the config but `iterations`, weights, class names."""
    fields = asdict(config)
    del fields["iterations"], fields["backbone_weights"]
    return tr.signature(
        config=fields, backbone_weights=weights.source, class_names=list(class_names)
    )


def read_inputs(
    input_uri: str, *, storage: StorageOptions | None, wait_timeout_s: float
) -> tuple[mf.Manifest, mf.Manifest]:
    """(pseudo-mask manifest, source manifest), once the pseudo masks are complete: the source
    is the output the masks were made from (`inputs[0]`), whose digest must not have changed.

    Raises:
        TimeoutError: no `_SUCCESS` within `wait_timeout_s`.
        ValueError: not a pseudo-mask output, or its source is not the one it was made from.
    """
    location = resolve(input_uri, storage)
    poll_s = min(5.0, max(wait_timeout_s / 10, 0.2))
    pseudo = mf.wait_for_success(location, timeout_s=wait_timeout_s, poll_s=poll_s)
    if pseudo.stage != "pseudo_masks":
        raise ValueError(f"--input must be a pseudo_masks output, {location.uri} is {pseudo.stage}")
    if not pseudo.inputs:
        raise ValueError(f"{location.uri}: the manifest names no input images (inputs is empty)")
    ref = pseudo.inputs[0]
    source = mf.read_manifest(resolve(ref.uri, storage))
    if source.stage not in SOURCE_STAGES:
        raise ValueError(f"{ref.uri} is a {source.stage} output, not one of {SOURCE_STAGES}")
    if ref.manifest_sha256 is not None and source.sha256 != ref.manifest_sha256:
        raise ValueError(
            f"{ref.uri} changed since the pseudo masks were made (manifest digest differs): "
            "re-run the pseudo-mask stage"
        )
    if list(source.class_names) != list(pseudo.class_names):
        raise ValueError(f"{ref.uri} and {location.uri} have different class names")
    return pseudo, source


def plan(
    pseudo: mf.Manifest, source: mf.Manifest, output: Location, log: Callable[[str], Any]
) -> tuple[data.RowPlan, mf.FileEntry | None]:
    """The join with every mask checked in storage; quarantined rows are written out.

    Raises:
        ValueError: no usable pseudo masks.
    """
    index = data.read_index(pseudo)
    source_rows = data.read_source_rows(source)
    listed = {f.path for f in pseudo.files}
    joined = data.plan_rows(index, source_rows, listed=listed)
    usable = [row for row in index if joined.train.get(row.image_id) == row.mask]
    problems = data.check_masks(pseudo.location, usable, num_classes=len(pseudo.class_names))
    rows = data.plan_rows(index, source_rows, listed=listed, mask_problems=problems)
    quarantine = mf.Quarantine(output)
    for image_id, mask, reason in rows.quarantined:
        quarantine.add(image_id, mask, reason)
    entry = quarantine.flush("masks")
    reasons = Counter(reason.split(":")[0] for _, _, reason in rows.quarantined)
    log(
        f"retrain: {len(rows.train)} training images with pseudo masks, "
        f"{len(rows.quarantined)} quarantined"
        + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.most_common(5))})" if reasons else "")
        + f", {len(rows.val)} val images with ground truth"
    )
    if not rows.train:
        raise ValueError(
            f"{pseudo.location.uri}: no usable pseudo masks ({len(rows.quarantined)} "
            f"quarantined, see {output.child('quarantine').uri})"
        )
    return rows, entry


def run_retrain(
    input_uri: str,
    output_uri: str,
    config: RetrainConfig,
    *,
    options: RetrainOptions | None = None,
    storage: StorageOptions | None = None,
    log: Callable[[str], Any] = print,
    inputs: tuple[mf.Manifest, mf.Manifest] | None = None,
) -> RunResult:
    """Runs (or resumes, or skips) the retrain stage on the current Ray instance; `inputs` are
    `read_inputs(input_uri)` when the caller has read them already.

    Raises:
        TimeoutError, ValueError (bad input or settings), TrainRefused, StageConflictError: as
            `read_inputs`, `micro_batching` and `pipelines.training.run.open_run` say.
    """
    from pipelines.retrain.loop import retrain_loop_per_worker

    options = options or RetrainOptions()
    batching = micro_batching(config, options)
    output = resolve(output_uri, storage)
    pseudo, source = inputs or read_inputs(
        input_uri, storage=storage, wait_timeout_s=options.wait_timeout_s
    )
    weights = tr.resolve_weights(config.backbone_weights, storage)
    signature = run_signature(config, pseudo.class_names, weights)
    inputs = [pseudo.input_ref(), source.input_ref()]
    run = tr.open_run(
        output, "retrain", signature, inputs, iterations=config.iterations, options=options, log=log
    )
    if run.skipped:
        return run.result(config.iterations)
    rows, quarantine_entry = plan(pseudo, source, output, log)
    fitted = tr.fit(
        retrain_loop_per_worker,
        {
            "config": config,
            "class_names": list(pseudo.class_names),
            "signature": signature,
            "weights": weights,
            "source": source.location,
            "val_rows": rows.val,
        },
        output=output,
        options=options,
        batching=batching,
        dataset=data.build_retrain_dataset(
            source,
            masks=pseudo.location,
            rows=rows,
            config=config,
            start_iteration=run.start_iteration,
            num_cpus_per_task=options.num_cpus_per_task,
        ),
    )
    files = [quarantine_entry] if quarantine_entry is not None else []
    manifest = _finish(config, options, run.stage, fitted, pseudo, rows, files, weights, log)
    return run.result(config.iterations, manifest)


def _finish(
    config: RetrainConfig,
    options: RetrainOptions,
    stage: mf.StageOutput,
    fitted: tuple[Any, float],
    pseudo: mf.Manifest,
    rows: data.RowPlan,
    more_files: list[mf.FileEntry],
    weights: tr.Weights,
    log: Callable[[str], Any],
) -> mf.Manifest:
    """Exports `model.pt` from the last checkpoint, writes `metrics.json` with the workers'
    val scores (in the checkpoint's meta), commits. `fitted`: (last checkpoint, seconds)."""
    from pipelines.training import checkpoint as ckpt

    checkpoint, train_seconds = fitted
    class_names = list(pseudo.class_names)
    with tr.final_checkpoint(checkpoint, config.iterations) as (directory, meta, history):
        state = ckpt.read_train_state(directory)
    evaluation = meta.get("evaluation")
    if not isinstance(evaluation, dict):
        raise RuntimeError("the last checkpoint holds no val evaluation")
    model = build_model(config.architecture, len(class_names))
    model.load_state_dict(state["model"], strict=True)
    scores = score_dict(np.asarray(evaluation["confusion"]), class_names)
    summary = {
        **scores,  # miou, per_class_iou, num_pixels
        "class_space": pseudo.class_space,
        "num_classes": len(class_names),
        "ground_truth": "val split images with ground truth that are not in the pseudo-mask "
        "index (never trained on), at their original size",
        "num_val_images": evaluation["images"],
        "val_skipped": evaluation["skipped"],
        "num_train_images": len(rows.train),
        "quarantined": len(rows.quarantined),
        "iterations": config.iterations,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "architecture": config.architecture,
        "backbone_weights": weights.source,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(evaluation["seconds"], 3),
    }
    manifest = tr.commit_run(
        stage,
        export=lambda path: export_model(
            path,
            model=model,
            architecture=config.architecture,
            class_names=class_names,
            config=asdict(config),
            iteration=config.iterations,
        ),
        metrics_file=METRICS_FILE,
        metrics_data=json.dumps({**summary, "history": history}, indent=1, sort_keys=True).encode(),
        metrics_rows=None,
        more_files=more_files,
        counts={
            "input": rows.index_rows,
            "output": 1,
            "quarantined": len(rows.quarantined),
            "train_images": len(rows.train),
            "val_images": evaluation["images"],
            "iterations": config.iterations,
        },
        class_names=class_names,
        class_space=pseudo.class_space,
        metrics=summary,
        extra={
            "iterations": config.iterations,
            "architecture": config.architecture,
            "num_workers": options.num_workers,
            "backbone_weights": weights.source,
        },
    )
    miou = "n/a (no val ground truth)" if summary["miou"] is None else f"{summary['miou']:.3f}"
    log(
        f"retrain: {config.iterations} iterations in {train_seconds:.0f} s, final loss "
        f"{summary['final_loss']:.4f}; val mIoU {miou} on {evaluation['images']} images "
        f"({evaluation['seconds']:.1f} s); wrote {stage.location.uri}"
    )
    return manifest


def score_dict(confusion: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """`miou` (None without scored pixels), `per_class_iou` by class name, `num_pixels`."""
    scores = ConfusionAccumulator(len(class_names))
    scores.merge(np.asarray(confusion, dtype=np.int64))
    values = scores.score().as_dict(class_names)
    if values["num_pixels"] == 0 or np.isnan(values["miou"]):
        values["miou"] = None
    return values


__all__ = ["RetrainConfig", "RetrainOptions", "micro_batching", "run_retrain"]
