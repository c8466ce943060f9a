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
import sys

from pipelines.cli import (
    Resources,
    UsageError,
    add_common_args,
    build_config,
    init_ray,
    job_options,
    reject_unused,
    run_job,
)
from pipelines.io.manifest import read_manifest
from pipelines.refine import RefineConfig, run_refine
from pipelines.seeds import METHODS

# pydensecrf is single-threaded: one CPU per task runs one CRF per core.
DEFAULT_RESOURCES = Resources(num_cpus_per_task=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.refine", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_common_args(parser)
    stage = parser.add_argument_group("refine options")
    stage.add_argument("--method", choices=METHODS, help="seed recipe (default weaktr)")
    stage.add_argument(
        "--bg-threshold",
        type=float,
        metavar="T",
        help="background plane value, in (0, 1) (default 0.43, WeakTr VOC)",
    )
    stage.add_argument(
        "--max-error-fraction",
        type=float,
        metavar="F",
        help="fail when more than this share of rows is quarantined (default 0.01)",
    )
    stage.add_argument(
        "--progress-every", type=int, metavar="N", help="a progress line every N units"
    )
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    reject_unused(args, "refine", "actor_pool_size", "batch_size")
    if args.progress_every is not None and args.progress_every < 1:
        raise UsageError("--progress-every: must be at least 1")
    config = build_config(
        RefineConfig,
        args,
        {
            "method": args.method,
            "bg_threshold": args.bg_threshold,
            "max_error_fraction": args.max_error_fraction,
        },
    )
    options = job_options(args, DEFAULT_RESOURCES)
    assert options.input is not None
    read_manifest(options.input)  # an unfinished or missing input fails before Ray starts
    init_ray(args)
    result = run_refine(
        options.input.uri,
        options.output.uri,
        config,
        storage=options.storage,
        num_cpus_per_task=options.resources.num_cpus_per_task,
        overwrite=options.overwrite,
        progress_every=args.progress_every,
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
