r"""Refine ingested CAMs into seed labels with a dense CRF on Ray Data CPU workers.

    python -m jobs.refine --input s3://bucket/run/ingest --output s3://bucket/run/refine \
        [--method weaktr|clip-es] [--bg-threshold 0.43] [--config crf.yaml] \
        [--num-cpus-per-task 1]

`--config FILE` holds fields of `pipelines.refine.RefineConfig` (CRF parameters such as
`bilateral_sxy`, `iterations`; unset ones take the method's published values); flags override
it. Rows that cannot be refined are quarantined with their reason (`<output>/quarantine/`); the
job exits 1 when their share exceeds `--max-error-fraction` (outputs kept, no `_SUCCESS`).
Exit status: 0 success; 1 failure with a one-line reason on stderr; 2 usage error.
"""

from __future__ import annotations

import argparse

from pipelines import cli as job
from pipelines.io.manifest import read_manifest
from pipelines.refine import RefineConfig, run_refine
from pipelines.seeds import METHODS

# pydensecrf is single-threaded: one CPU per task runs one CRF per core.
DEFAULT_RESOURCES = job.Resources(num_cpus_per_task=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser, stage = job.job_parser("jobs.refine", __doc__, "refine options")
    stage.add_argument("--method", choices=METHODS, help="seed recipe (default weaktr)")
    threshold = "background plane value, in (0, 1) (default 0.43, WeakTr VOC)"
    stage.add_argument("--bg-threshold", type=float, metavar="T", help=threshold)
    job.add_max_error_fraction(stage)
    unit = (
        "rows per unit: one shard and one completion record each, whole input row groups "
        "(default: sized for ~96 MiB shards)"
    )
    stage.add_argument("--rows-per-unit", type=int, metavar="N", help=unit)
    job.add_progress_every(stage, "a progress line every N images (default: one every 10 s)")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = job.stage_options(args, "refine", DEFAULT_RESOURCES)
    fields = job.given(args, "method", "bg_threshold", "max_error_fraction", "rows_per_unit")
    config = job.build_config(RefineConfig, args, fields)
    read_manifest(options.input)  # an unfinished or missing input fails before Ray starts
    job.init_ray(args)
    result = run_refine(
        *options.uris, config, progress_every=args.progress_every, **job.stage_kwargs(options)
    )
    return job.result_status(result)


main, cli = job.entry_points(_main)

if __name__ == "__main__":
    cli()
