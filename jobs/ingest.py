r"""Ingest raw WSSS inputs (images, CAMs, image-level labels) into canonical Parquet shards.

    python -m jobs.ingest --input s3://bucket/voc --output s3://bucket/run/ingest \
        --classes voc --split train=train_aug.txt --split val=val.txt

Bad rows are quarantined with their reason (`<output>/quarantine/`); the job exits 1 when
their share exceeds `--max-error-fraction` (outputs kept, no `_SUCCESS`).
"""

from __future__ import annotations

import argparse

from pipelines import cli as job
from pipelines.ingest import IngestConfig, run_ingest


def build_parser() -> argparse.ArgumentParser:
    parser, stage = job.job_parser("jobs.ingest", __doc__, "ingest options")
    add = stage.add_argument
    add("--layout", choices=("mctformer", "clip-es"), help="CAM file layout")
    classes = "class space, or a classes.txt (default: the input's classes.txt)"
    add("--classes", metavar=job.CLASSES_METAVAR, help=classes)
    split = (
        "split list (one id per line), relative to --input or a URI; repeatable. "
        "Without it every image of the input is ingested, with no split"
    )
    add("--split", action="append", metavar="[NAME=]FILE", help=split)
    job.add_max_error_fraction(stage)
    add("--max-pixels", type=int, metavar="N", help="per image (default 50e6)")
    unit = (
        "rows per unit: one shard and one completion record each "
        "(default: sized for ~96 MiB shards from the first rows)"
    )
    add("--rows-per-unit", type=int, metavar="N", help=unit)
    add("--rows-per-shard", type=int, metavar="N", help="the old name of --rows-per-unit")
    group = "rows per Parquet row group: what later stages read at once (default 16)"
    add("--rows-per-group", type=int, metavar="N", help=group)
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = job.stage_options(args, "ingest")
    names = ("layout", "classes", "max_error_fraction", "max_pixels", "rows_per_shard")
    fields = job.given(args, *names, "rows_per_unit", "rows_per_group")
    fields["splits"] = tuple(args.split) if args.split else None
    config = job.build_config(IngestConfig, args, fields)
    job.init_ray(args)
    return job.result_status(run_ingest(*options.uris, config, **job.stage_kwargs(options)))


main, cli = job.entry_points(_main)

if __name__ == "__main__":
    cli()
