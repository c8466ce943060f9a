r"""Per-class IoU and mIoU of a stage's label maps (seeds or pseudo masks) against ground truth.

    python -m jobs.evaluate --input s3://bucket/run/pseudo_masks --gt s3://bucket/run/refine \
        [--classes voc|coco91|coco81|FILE] [--average-over NAME,ID,...] [--json] \
        [--output s3://bucket/run/evaluate]

`--input`: a refine output (scores its `seed` column) or a pseudo_masks output (its
`masks/*.png`). `--gt`: an ingest or refine output (its `gt` column). Both need `_SUCCESS`;
only the files their manifests list are read. Images are matched by `image_id`; predictions
without ground truth, ground truth without a prediction and pairs that cannot be scored (size
mismatch, undecodable PNG; quarantined with the reason) are counted and reported, not fatal.

Class space: the ground truth's manifest (else the prediction's). `--classes` names the space to
score in: required when neither manifest names one, and converts COCO label maps explicitly
between coco91 (category ids) and coco81 (contiguous); any other mismatch is refused.
IoU_c = TP / (TP + FP + FN) over pixels whose GT is not 255; mIoU = nan-mean over the classes of
`--average-over` (default: every class of the space; classes absent from both GT and prediction,
such as coco91's 10 unused ids, have no IoU and drop out). The output says which space and how
many classes were averaged.

Prints a per-class table (or, with `--json`, the metrics as JSON) on stdout; progress goes to
stderr. `--output` also writes an `evaluate` stage directory: `metrics.json`,
`quarantine/evaluate.parquet`, `manifest.json` (with the metrics), `_SUCCESS`.
Exit status: 0 success; 1 failure (also: no image had both a prediction and ground truth);
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.cli import (
    Resources,
    UsageError,
    add_common_args,
    build_config,
    init_ray,
    reject_unused,
    resources,
    run_job,
    storage_options,
)
from pipelines.evaluate import EvaluateConfig, run_evaluate
from pipelines.evaluate.scoring import format_table
from pipelines.evaluate.stage import requested_space
from pipelines.io.manifest import read_manifest
from pipelines.io.storage import resolve

# Scoring is light numpy work: half a CPU per task leaves room for Ray Data on 2 cores.
DEFAULT_RESOURCES = Resources(num_cpus_per_task=0.5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_common_args(parser)
    for action in parser._actions:  # the evaluate stage directory is optional
        if action.dest == "output":
            action.required = False
            action.help = "optional: also write an evaluate stage directory here"
        elif action.dest == "input":
            action.help = "refine or pseudo_masks output holding the label maps to score"
    stage = parser.add_argument_group("evaluate options")
    stage.add_argument(
        "--gt", required=True, metavar="URI", help="ingest or refine output holding `gt`"
    )
    stage.add_argument(
        "--classes",
        metavar="voc|coco91|coco81|FILE",
        help="class space to score in (default: the manifests'); converts coco91 <-> coco81",
    )
    stage.add_argument(
        "--average-over",
        metavar="NAMES",
        help="comma-separated class names or ids the mIoU averages over (default: all)",
    )
    stage.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    reject_unused(args, "evaluate", "actor_pool_size", "batch_size")
    average_over = None
    if args.average_over is not None:
        average_over = tuple(c.strip() for c in args.average_over.split(",") if c.strip())
    config = build_config(
        EvaluateConfig, args, {"classes": args.classes, "average_over": average_over}
    )
    try:
        storage = storage_options(args).with_env_defaults()
    except ValueError as e:
        raise UsageError(f"AWS_ENDPOINT_URL: {e}") from None
    locations = {}
    for flag, value in (("--input", args.input), ("--gt", args.gt), ("--output", args.output)):
        if value is not None:
            try:
                locations[flag] = resolve(value, storage)
            except ValueError as e:
                raise UsageError(f"{flag}: {e}") from None
    if config.classes is not None:
        try:
            requested_space(config.classes, storage)
        except (OSError, ValueError) as e:
            raise UsageError(f"--classes: {e}") from None
    # an unfinished or missing input fails before Ray starts
    read_manifest(locations["--input"])
    read_manifest(locations["--gt"])
    init_ray(args)
    output = locations.get("--output")
    metrics = run_evaluate(
        locations["--input"].uri,
        locations["--gt"].uri,
        output.uri if output is not None else None,
        config,
        storage=storage,
        num_cpus_per_task=resources(args, DEFAULT_RESOURCES).num_cpus_per_task,
        overwrite=bool(args.overwrite),
        report=lambda line: print(line, file=sys.stderr),
    )
    if args.json:
        print(json.dumps(metrics, indent=2, allow_nan=False))
    else:
        print(format_table(metrics))
    if not metrics.get("images"):
        print(
            "error: no image had both a prediction and ground truth (see the counts above)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(_main, argv)


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
