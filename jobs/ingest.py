r"""Ingest raw WSSS inputs (images, CAMs, image-level labels) into canonical Parquet shards.

    python -m jobs.ingest --input s3://bucket/voc --output s3://bucket/run/ingest \
        --classes voc --split train=train_aug.txt --split val=val.txt

Bad rows are quarantined with their reason (`<output>/quarantine/`); the job exits 1 when
their share exceeds `--max-error-fraction` (outputs kept, no `_SUCCESS`).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import (
    add_common_args,
    build_config,
    init_ray,
    job_options,
    reject_unused,
    run_job,
)
from pipelines.ingest import IngestConfig, run_ingest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_common_args(parser)
    stage = parser.add_argument_group("ingest options")
    stage.add_argument("--layout", choices=("mctformer", "clip-es"), help="CAM file layout")
    stage.add_argument(
        "--classes",
        metavar="voc|coco91|coco81|FILE",
        help="class space, or a classes.txt (default: the input's classes.txt)",
    )
    stage.add_argument(
        "--split",
        action="append",
        metavar="[NAME=]FILE",
        help="split list (one id per line), relative to --input or a URI; repeatable. "
        "Without it every image of the input is ingested, with no split",
    )
    stage.add_argument(
        "--max-error-fraction",
        type=float,
        metavar="F",
        help="fail when more than this share of rows is quarantined (default 0.01)",
    )
    stage.add_argument("--max-pixels", type=int, metavar="N", help="per image (default 50e6)")
    stage.add_argument("--rows-per-shard", type=int, metavar="N", help="default 256")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    reject_unused(args, "ingest", "actor_pool_size", "batch_size")
    config = build_config(
        IngestConfig,
        args,
        {
            "layout": args.layout,
            "classes": args.classes,
            "splits": tuple(args.split) if args.split else None,
            "max_error_fraction": args.max_error_fraction,
            "max_pixels": args.max_pixels,
            "rows_per_shard": args.rows_per_shard,
        },
    )
    options = job_options(args)
    init_ray(args)
    assert options.input is not None
    result = run_ingest(
        options.input.uri,
        options.output.uri,
        config,
        storage=options.storage,
        num_cpus_per_task=options.resources.num_cpus_per_task,
        overwrite=options.overwrite,
    )
    if not result.ok:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(_main, argv)


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
