r"""Run the chained pipeline: ingest → refine → train → pseudo masks → retrain → evaluate.

    python -m jobs.pipeline --demo                       # local Ray, writes outputs/demo
    python -m jobs.pipeline --input data/voc --output outputs/try --classes voc \
        --split train=train.txt --split val=val.txt --demo-settings   # your data, on a laptop
    python -m jobs.pipeline --input s3://bucket/voc --output s3://bucket/run --classes voc \
        --clip-weights s3://bucket/weights/ViT-B-16.pt --config pipeline.yaml

Each stage writes `<output>/<stage>/`; a complete stage with the same config and inputs is
skipped, a changed one re-runs with everything after it. Prints the mIoU table (CAM argmax, CRF
seeds, pseudo masks, retrained model) and writes `<output>/summary.json`. `--config FILE` holds
fields of `pipelines.pipeline.PipelineConfig`, with one section per stage (`ingest`, `refine`,
`pseudo_masks`, `retrain`, `evaluate`) holding that stage's config fields. `--demo` generates a
small synthetic dataset and uses demo-sized settings (`pipelines.pipeline.DEMO_CONFIG`) under
the file and flags; `--demo-settings` uses the same settings (tiny model, short schedules) on
the dataset `--input` names, so the chain runs on a user's own data in minutes on a laptop.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import (
    UsageError,
    add_common_args,
    build_config,
    init_ray,
    job_options,
    run_job,
)
from pipelines.pipeline import DEMO_CONFIG, DEVICES, DemoData, PipelineConfig, run_pipeline

DEFAULT_DEMO_OUTPUT = "outputs/demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="URI", help="dataset root (MCTformer/WeakTr layout)")
    source.add_argument("--demo", action="store_true", help="generate the synthetic dataset")
    parser.add_argument(
        "--demo-settings",
        action="store_true",
        help="with --input: the demo's settings (tiny model, short schedules) under the config "
        "file and flags",
    )
    add_common_args(parser, model=True, input=False)
    # --output is optional for the demo
    for action in parser._actions:
        if action.dest == "output":
            action.required = False
    stage = parser.add_argument_group("pipeline options")
    stage.add_argument("--classes", metavar="voc|coco91|coco81|FILE", help="ingest class space")
    stage.add_argument("--split", action="append", metavar="[NAME=]FILE", help="ingest split")
    stage.add_argument("--method", choices=("weaktr", "clip-es"), help="seed recipe")
    stage.add_argument("--iterations", type=int, metavar="N", help="training iterations")
    stage.add_argument("--num-workers", type=int, metavar="W", help="Ray Train workers")
    stage.add_argument("--clip-weights", metavar="URI", help="CLIP weights (default random)")
    stage.add_argument(
        "--device",
        choices=sorted(DEVICES),
        help="training, pseudo masks and retraining on GPU or CPU (default auto: GPU when the "
        "cluster has one)",
    )
    stage.add_argument("--num-images", type=int, metavar="N", help="--demo dataset size (40)")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.output is None:
        if not args.demo:
            raise UsageError("--output is required with --input")
        args.output = DEFAULT_DEMO_OUTPUT
    config = build_config(
        PipelineConfig,
        args,
        {
            "ingest.classes": args.classes,
            "ingest.splits": tuple(args.split) if args.split else None,
            "refine.method": args.method,
            "model": args.model,
            "iterations": args.iterations,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "num_cpus_per_task": args.num_cpus_per_task,
            "actor_pool_size": args.actor_pool_size,
            "clip_weights": args.clip_weights,
            "device": args.device,
        },
        base=DEMO_CONFIG if args.demo or args.demo_settings else None,
    )
    options = job_options(args)
    if args.num_images is not None and not args.demo:
        raise UsageError("--num-images: only with --demo")
    if args.demo_settings and args.demo:
        raise UsageError("--demo-settings: only with --input (--demo already uses them)")
    demo = DemoData(num_images=args.num_images or DemoData.num_images) if args.demo else None
    init_ray(args)
    run_pipeline(args.input, options.output.uri, config, demo=demo, storage=options.storage)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(_main, argv)


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
