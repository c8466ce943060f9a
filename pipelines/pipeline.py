"""The chained pipeline: (synthetic data) → ingest → refine → train, in one driver.

Each stage writes `<output>/<stage>/` with its own manifest and `_SUCCESS`. A stage that is
already complete for the same config and inputs is skipped (the stage itself says so); a stage
whose config or inputs changed is re-run with `overwrite`, which changes its manifest digest,
so every later stage sees new inputs and re-runs too. `<output>/summary.json` holds the mIoU
rows of CONTRACTS.md for the stages this version runs.

Stages not built yet (pseudo masks, retraining) are listed in the summary's `not_run` and shown
as such in the table; their rows stay null.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipelines.ingest import IngestConfig, run_ingest
from pipelines.manifest import StageConflictError, read_manifest
from pipelines.refine import RefineConfig, run_refine
from pipelines.storage import Location, StorageOptions, exists, resolve, write_bytes_atomic
from pipelines.synthetic_io import write_dataset

NOT_BUILT = ("pseudo_masks", "retrained")  # summary rows of stages this version lacks
_T = TypeVar("_T")


@dataclass(frozen=True)
class DemoData:
    """The synthetic dataset `--demo` generates."""

    num_images: int = 40  # train + val images
    seed: int = 0  # dataset seed
    height: int = 240  # image size (VOC-like aspect, small enough for 2 cores)
    width: int = 320
    val_fraction: float = 0.25  # share of the images in val.txt


@dataclass(frozen=True)
class PipelineConfig:
    """Options of the chained run."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    model: str = "tiny"  # model preset trained on the seeds
    iterations: int = 60  # training iterations
    batch_size: int = 4  # global training batch
    num_workers: int = 2  # Ray Train workers
    checkpoint_every: int = 30  # training checkpoints
    log_every: int = 10  # training metrics rows
    num_cpus_per_task: float = 0.5  # Ray Data tasks (fractional on 2 cores)
    clip_weights: str | None = None  # CLIP weights URI; None = random init


def run_pipeline(
    input_uri: str | None,
    output_uri: str,
    config: PipelineConfig,
    *,
    demo: DemoData | None = None,
    storage: StorageOptions | None = None,
    report: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Runs the chain on the current Ray instance and writes `<output>/summary.json`.

    Args:
        input_uri: dataset root (ingest's input); None with `demo`.
        output_uri: the pipeline's output directory (one sub-directory per stage).
        config: options of every stage.
        demo: generate the synthetic dataset under `<output>/data/` and use it as input.
        storage: object-store endpoint/region.
        report: progress sink.

    Returns:
        The summary dict (also written to `summary.json`).
    """
    from pipelines.train import TrainJobConfig, run_train
    from weakclip.config import preset

    started = time.monotonic()
    out = resolve(output_uri, storage)
    ingest_config = config.ingest
    if demo is not None:
        data = out.child(f"data-n{demo.num_images}-s{demo.seed}-{demo.height}x{demo.width}")
        _ensure_demo_data(data, demo, report)
        input_uri = data.uri
        ingest_config = dataclasses.replace(ingest_config, splits=("train.txt", "val.txt"))
    if input_uri is None:
        raise ValueError("give --input, or --demo to generate the synthetic dataset")
    stage_uri = {s: out.child(s).uri for s in ("ingest", "refine", "train")}

    ingest = _rerun_on_change(
        "ingest",
        lambda overwrite: run_ingest(
            input_uri,
            stage_uri["ingest"],
            ingest_config,
            storage=storage,
            num_cpus_per_task=config.num_cpus_per_task,
            overwrite=overwrite,
            report=report,
        ),
        report,
    )
    if not ingest.ok:
        raise RuntimeError(f"ingest failed: {ingest.message}")
    refine = _rerun_on_change(
        "refine",
        lambda overwrite: run_refine(
            stage_uri["ingest"],
            stage_uri["refine"],
            config.refine,
            storage=storage,
            num_cpus_per_task=max(config.num_cpus_per_task, 0.5),
            overwrite=overwrite,
            report=report,
        ),
        report,
    )
    if not refine.ok:
        raise RuntimeError(f"refine failed: {refine.message}")
    base = preset(config.model)
    model = dataclasses.replace(
        base,
        train=dataclasses.replace(
            base.train, iterations=config.iterations, batch_size=config.batch_size
        ),
    )
    _rerun_on_change(
        "train",
        lambda overwrite: run_train(
            TrainJobConfig(
                input=stage_uri["refine"],
                output=stage_uri["train"],
                model=model,
                num_workers=config.num_workers,
                clip_weights=config.clip_weights,
                overwrite=overwrite,
                checkpoint_every=config.checkpoint_every,
                log_every=config.log_every,
                num_cpus_per_task=config.num_cpus_per_task,
                storage=storage or StorageOptions(),
            ),
            log=report,
        ),
        report,
    )
    metrics = read_manifest(stage_uri["refine"]).metrics or {}
    summary: dict[str, Any] = {
        "cam_argmax": _miou(metrics.get("cam_argmax")),
        "crf_seeds": _miou(metrics.get("seeds")),
        "pseudo_masks": None,
        "retrained": None,
        "not_run": list(NOT_BUILT),
        "class_space": read_manifest(stage_uri["refine"]).class_space,
        "stages": stage_uri,
        "seconds": round(time.monotonic() - started, 1),
    }
    write_bytes_atomic(out, "summary.json", json.dumps(summary, indent=2).encode())
    report(format_summary(summary))
    report(f"summary: {out.child('summary.json').uri}")
    return summary


def _rerun_on_change(stage: str, run: Callable[[bool], _T], report: Callable[[str], Any]) -> _T:
    """Runs a stage; if its output holds another config or inputs, re-runs it over them."""
    try:
        return run(False)
    except StageConflictError as error:
        report(f"{stage}: config or inputs changed ({error}); re-running it and what follows")
        return run(True)


def _ensure_demo_data(data: Location, demo: DemoData, report: Callable[[str], Any]) -> None:
    # write_dataset writes the split lists last: their presence means a complete dataset.
    if exists(data, "val.txt") and exists(data, "train.txt"):
        report(f"demo data: reusing {data.uri}")
        return
    report(f"demo data: generating {demo.num_images} synthetic images into {data.uri}")
    write_dataset(
        data.fs,
        data.path,
        num_images=demo.num_images,
        seed=demo.seed,
        height=demo.height,
        width=demo.width,
        val_fraction=demo.val_fraction,
    )


def _miou(block: Any) -> float | None:
    if isinstance(block, dict) and isinstance(block.get("miou"), (int, float)):
        return float(block["miou"])
    return None


def format_summary(summary: dict[str, Any]) -> str:
    """The CONTRACTS.md table: one row per summary entry, mIoU in percent."""
    rows = [
        ("CAM argmax", "cam_argmax"),
        ("CRF seeds", "crf_seeds"),
        ("pseudo masks", "pseudo_masks"),
        ("retrained model", "retrained"),
    ]
    lines = [f"{'':<18}{'mIoU':>8}", "-" * 26]
    for label, key in rows:
        value = summary.get(key)
        if key in summary.get("not_run", ()):
            shown = "not run"
        elif value is None:
            shown = "no GT"
        else:
            shown = f"{100 * value:.1f}%"
        lines.append(f"{label:<18}{shown:>8}")
    return "\n".join(lines)
