"""The chained pipeline, in one driver: (synthetic data) → ingest → refine → train → pseudo
masks → retrain → evaluate.

Each stage writes `<output>/<stage>/` with its own manifest and `_SUCCESS`. A stage that is
already complete for the same config and inputs is skipped (the stage itself says so); a stage
whose config or inputs changed is re-run with `overwrite`, which changes its manifest digest,
so every later stage sees new inputs and re-runs too. Training and retraining resume from their
last checkpoint after an interruption. `<output>/summary.json` holds the mIoU rows of
docs/CONTRACTS.md: CAM argmax and CRF seeds (refine), pseudo masks (evaluate, on the images the
masks were made for) and the retrained model (retrain, on the val split's ground truth).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from pipelines.cli.options import CLASSES_METAVAR, DEVICES, UsageError, add_common_args, given
from pipelines.evaluate import EvaluateConfig, run_evaluate
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.io.manifest import Manifest, StageConflictError, read_manifest
from pipelines.io.storage import Location, StorageOptions, exists, resolve, write_bytes_atomic
from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks
from pipelines.refine import RefineConfig, run_refine
from pipelines.report.run import refine_rows, write_run_report
from pipelines.retrain import RetrainConfig, RetrainOptions, run_retrain
from pipelines.synthetic import write_dataset
from pipelines.train import TrainJobConfig, run_train
from weakclip.config import WeakCLIPConfig, check_fields, preset

STAGES = ("ingest", "refine", "train", "pseudo_masks", "retrain", "evaluate")
DEFAULT_DEMO_OUTPUT = "outputs/demo"
_T = TypeVar("_T")


@dataclass(frozen=True)
class DemoData:
    """The synthetic dataset `--demo` generates."""

    num_images: int = 40  # train + val images
    seed: int = 0  # dataset seed
    height: int = 240  # image size (VOC-like aspect, small enough for 2 cores)
    width: int = 320
    val_fraction: float = 0.25  # share of the images in val.txt


# `--demo` settings under the config file and flags: sized for a 2-core laptop in minutes.
DEMO_CONFIG: Mapping[str, Any] = {
    "model": "tiny",
    # 100 iterations left classes of the VOC and COCO spaces at IoU 0; 300 left the camouflage
    # family 0.5 below its seeds in one chain run, 450 gained 4.7 over 300 (docs/METHOD.md)
    "iterations": 450,
    "coco_iterations": 600,  # the paper trains COCO longer (40k against 20k; docs/METHOD.md)
    "batch_size": 4,
    "lr": 1e-3,  # random CLIP weights: the adapter and decoder learn from scratch
    "checkpoint_every": 50,
    "log_every": 20,
    "pseudo_masks": {"report_images": 8},
    "retrain": {
        "architecture": "small",
        "iterations": 450,  # 150 gave val mIoU under the CAM argmax's (docs/METHOD.md)
        "batch_size": 4,
        "crop_size": 240,
        "lr": 3e-3,
        "warmup_iterations": 20,
    },
}


@dataclass(frozen=True)
class PipelineConfig:
    """Options of the chained run (`--config` fields; per-stage sections nest). Defaults are
    those of a real run (the `vit-b-16` preset's schedule); `--demo` puts `DEMO_CONFIG` under them.
    """

    ingest: IngestConfig = field(default_factory=IngestConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    pseudo_masks: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    model: str = "vit-b-16"  # WeakCLIP preset trained on the seeds
    iterations: int | None = None  # WeakCLIP training iterations; None = the preset's
    coco_iterations: int | None = None  # instead of `iterations` in a COCO class space
    batch_size: int | None = None  # global WeakCLIP batch; None = the preset's
    lr: float | None = None  # WeakCLIP peak learning rate; None = the preset's (1e-4)
    num_workers: int = 2  # Ray Train workers (training and retraining)
    checkpoint_every: int = 1000  # training/retraining iterations between checkpoints
    log_every: int = 50  # training/retraining iterations between metrics rows
    num_cpus_per_task: float = 0.5  # Ray Data tasks (fractional on 2 cores)
    actor_pool_size: int = 1  # pseudo-mask model replicas
    device: str = "auto"  # auto (GPU when the cluster has one) | cpu | gpu
    clip_weights: str | None = None  # CLIP weights URI; None = random init (demo, tests)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {sorted(DEVICES)}, got {self.device!r}")
        counts = ("num_workers", "checkpoint_every", "log_every", "actor_pool_size")
        check_fields(self, ">= 1", *counts, "iterations", "coco_iterations", "batch_size")
        check_fields(self, "> 0", "lr", "num_cpus_per_task")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options of `jobs.pipeline`: the input (or `--demo`), the shared ones, its own."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="URI", help="dataset root (MCTformer/WeakTr layout)")
    source.add_argument("--demo", action="store_true", help="generate the synthetic dataset")
    demo = "the demo's settings (tiny model, short schedules) under the config file and flags"
    parser.add_argument("--demo-settings", action="store_true", help=f"with --input: {demo}")
    add_common_args(parser, model=True, input=False)
    for action in parser._actions:  # --output is optional for the demo
        if action.dest == "output":
            action.required = False
    add = parser.add_argument_group("pipeline options").add_argument
    add("--classes", metavar=CLASSES_METAVAR, help="ingest class space")
    add("--split", action="append", metavar="[NAME=]FILE", help="ingest split")
    add("--method", choices=("weaktr", "clip-es"), help="seed recipe")
    add("--iterations", type=int, metavar="N", help="training iterations")
    add("--num-workers", type=int, metavar="W", help="Ray Train workers")
    add("--clip-weights", metavar="URI", help="CLIP weights (default random)")
    gpu = "GPU or CPU (default auto: GPU when the cluster has one)"
    add("--device", choices=sorted(DEVICES), help=f"training, pseudo masks and retraining on {gpu}")
    add("--num-images", type=int, metavar="N", help="--demo dataset size (40)")


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the flags set (None: not given); dotted keys are stage fields."""
    return {
        "ingest.classes": args.classes,
        "ingest.splits": tuple(args.split) if args.split else None,
        "refine.method": args.method,
        **given(args, "model", "iterations", "batch_size", "num_workers", "num_cpus_per_task"),
        **given(args, "actor_pool_size", "clip_weights", "device"),
    }


def demo_data(args: argparse.Namespace) -> tuple[DemoData | None, Mapping[str, Any] | None]:
    """`--demo`'s dataset (None without it) and the settings under the file and flags
    (`DEMO_CONFIG` with `--demo` or `--demo-settings`); a demo's `--output` defaults to
    `DEFAULT_DEMO_OUTPUT`.

    Raises:
        UsageError: no `--output` with `--input`, or a demo option without the demo.
    """
    if args.output is None:
        if not args.demo:
            raise UsageError("--output is required with --input")
        args.output = DEFAULT_DEMO_OUTPUT
    if args.num_images is not None and not args.demo:
        raise UsageError("--num-images: only with --demo")
    if args.demo_settings and args.demo:
        raise UsageError("--demo-settings: only with --input (--demo already uses them)")
    demo = DemoData(num_images=args.num_images or DemoData.num_images) if args.demo else None
    return demo, DEMO_CONFIG if args.demo or args.demo_settings else None


def run_pipeline(
    input_uri: str | None,
    output_uri: str,
    config: PipelineConfig,
    *,
    demo: DemoData | None = None,
    storage: StorageOptions | None = None,
    report: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Runs the chain on the current Ray instance; returns the summary, also written to
    `<output>/summary.json`. `input_uri` is the dataset root, None with `demo` (the synthetic
    dataset is generated under `<output>/data-*/`).

    Raises:
        RuntimeError: a stage failed (its message says which and why).
    """
    started, seconds = time.monotonic(), {}
    storage = storage or StorageOptions()
    out = resolve(output_uri, storage)
    ingest_config = config.ingest
    if demo is not None:
        input_uri = _ensure_demo_data(out, demo, report)
        ingest_config = dataclasses.replace(ingest_config, splits=("train.txt", "val.txt"))
    if input_uri is None:
        raise ValueError("give --input, or --demo to generate the synthetic dataset")
    uri = {s: out.child(s).uri for s in STAGES}
    stage = partial(_run_stage, seconds=seconds, report=report)
    data = dict(storage=storage, num_cpus_per_task=config.num_cpus_per_task, report=report)
    stage("ingest", partial(run_ingest, input_uri, uri["ingest"], ingest_config, **data))
    stage("refine", partial(run_refine, uri["ingest"], uri["refine"], config.refine, **data))
    refined = read_manifest(uri["refine"])  # class space: the schedule; metrics: the summary
    weakclip = _weakclip(config, refined.class_space)
    stage(
        "train",
        lambda overwrite: run_train(
            TrainJobConfig(
                *(uri["refine"], uri["train"], weakclip, config.clip_weights),
                storage=storage,
                **_run_options(config, overwrite),
            ),
            log=report,
        ),
    )
    model_pt = out.child("train", "model.pt").uri
    masks = (uri["refine"], uri["pseudo_masks"], model_pt, config.pseudo_masks)
    pool = dict(actor_pool_size=config.actor_pool_size, use_gpu=DEVICES[config.device])
    stage("pseudo_masks", partial(run_pseudo_masks, *masks, **pool, **data))
    retrained = stage(
        "retrain",
        lambda overwrite: run_retrain(
            *(uri["pseudo_masks"], uri["retrain"], config.retrain),
            options=RetrainOptions(**_run_options(config, overwrite)),
            storage=storage,
            log=report,
        ),
    )
    scored = (uri["pseudo_masks"], uri["refine"], uri["evaluate"], config.evaluate)
    evaluated = stage("evaluate", partial(run_evaluate, *scored, **data))
    summary = _summary(refined, config, evaluated, retrained.manifest.metrics)
    summary["stages"] = uri
    summary["seconds"] = {**seconds, "total": round(time.monotonic() - started, 1)}
    summary["report"] = write_run_report(out, summary, storage=storage, report=report)
    write_bytes_atomic(out, "summary.json", json.dumps(summary, indent=2).encode())
    report(format_summary(summary))
    report(f"visual report: {summary['report']}")
    report(f"summary: {out.child('summary.json').uri}")
    return summary


def _run_stage(
    name: str, run: Callable[..., _T], *, seconds: dict[str, float], report: Callable[[str], Any]
) -> _T:
    """Runs stage `name` (`run(overwrite=...)`), re-running it over an output that holds
    another config or inputs; its wall time goes to `seconds`.

    Raises:
        RuntimeError: the stage's result is not `ok`.
    """
    report(f"== {name} ==")
    t0 = time.monotonic()
    try:
        result = run(overwrite=False)
    except StageConflictError as error:
        report(f"{name}: config or inputs changed ({error}); re-running it and what follows")
        result = run(overwrite=True)
    seconds[name] = round(time.monotonic() - t0, 1)
    if getattr(result, "ok", True) is False:
        raise RuntimeError(f"{name} failed: {result.message}")  # type: ignore[attr-defined]
    return result


def _run_options(config: PipelineConfig, overwrite: bool) -> dict[str, Any]:
    """`RunOptions` of training and retraining in the chain: an interrupted run resumes."""
    names = ("num_workers", "checkpoint_every", "log_every", "num_cpus_per_task")
    options = {name: getattr(config, name) for name in names}
    return {**options, "resume": True, "overwrite": overwrite, "use_gpu": DEVICES[config.device]}


def _weakclip(config: PipelineConfig, class_space: str) -> WeakCLIPConfig:
    """The WeakCLIP config the chain trains: the preset's, the pipeline's schedule over it
    (`coco_iterations`, when given, in the COCO class spaces)."""
    base = preset(config.model)
    coco = class_space.startswith("coco") and config.coco_iterations
    train = dataclasses.replace(
        base.train,
        iterations=(config.coco_iterations if coco else config.iterations) or base.train.iterations,
        batch_size=config.batch_size or base.train.batch_size,
        lr=config.lr or base.train.lr,
    )
    return dataclasses.replace(base, train=train)


def _summary(
    refine: Manifest, config: PipelineConfig, evaluated: Mapping[str, Any], retrained: Any
) -> dict[str, Any]:
    """The mIoU rows of docs/CONTRACTS.md and what each was measured on. CAM argmax and seeds:
    on the split the pseudo masks were made for (when it is one split with ground truth), else
    over every image with ground truth (`refine_rows`)."""
    splits = config.pseudo_masks.splits
    rows = refine_rows(refine.metrics or {}, splits[0] if splits and len(splits) == 1 else None)
    return {
        **rows,
        "pseudo_masks": _miou(evaluated),
        "retrained": _miou(retrained),
        "class_space": refine.class_space,
        "measured_on": {
            **rows["measured_on"],
            "pseudo_masks": _images(evaluated, "images"),
            "retrained": _images(retrained, "num_val_images", "val split (not trained on)"),
        },
    }


def _ensure_demo_data(out: Location, demo: DemoData, report: Callable[[str], Any]) -> str:
    """The URI of `demo`'s dataset under `out`, generated unless it is there."""
    data = out.child(f"data-n{demo.num_images}-s{demo.seed}-{demo.height}x{demo.width}")
    # write_dataset writes the split lists last: their presence means a complete dataset.
    if exists(data, "val.txt") and exists(data, "train.txt"):
        report(f"demo data: reusing {data.uri}")
        return data.uri
    report(f"demo data: generating {demo.num_images} synthetic images into {data.uri}")
    write_dataset(data.fs, data.path, **dataclasses.asdict(demo))
    return data.uri


def _images(metrics: Mapping[str, Any] | None, key: str, what: str = "the masks' images") -> str:
    count = (metrics or {}).get(key)
    return f"{what}, {count} images" if isinstance(count, int) else what


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _miou(block: Any) -> float | None:
    return _number(block.get("miou")) if isinstance(block, dict) else None


def format_summary(summary: dict[str, Any]) -> str:
    """The docs/CONTRACTS.md table: one row per summary entry, mIoU in percent."""
    rows = [
        ("CAM argmax", "cam_argmax"),
        ("CRF seeds", "crf_seeds"),
        ("pseudo masks", "pseudo_masks"),
        ("retrained model", "retrained"),
    ]
    on = summary.get("measured_on") or {}
    lines = [f"{'':<18}{'mIoU':>8}   measured on ({summary.get('class_space')} classes)", "-" * 64]
    for label, key in rows:
        value = summary.get(key)
        shown = "no GT" if value is None else f"{100 * value:.1f}%"
        lines.append(f"{label:<18}{shown:>8}   {on.get(key, '')}".rstrip())
    return "\n".join(lines)
