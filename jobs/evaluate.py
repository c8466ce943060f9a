r"""Per-class IoU and mIoU of a stage's label maps (seeds or pseudo masks) against ground truth.

    python -m jobs.evaluate --input s3://bucket/run/pseudo_masks --gt s3://bucket/run/refine \
        [--classes voc|coco91|coco81|FILE] [--average-over NAME,ID,...] [--json] \
        [--output s3://bucket/run/evaluate]

`--input`: a refine output (scores its `seed` column) or a pseudo_masks output (its
`masks/*.png`). `--gt`: an ingest or refine output (its `gt` column). Both need `_SUCCESS`;
only the files their manifests list are read. Images are matched by `image_id`; predictions
without ground truth, ground truth without a prediction and pairs that cannot be scored (size
mismatch, undecodable PNG; quarantined with the reason) are counted and reported; more than
`--max-error-fraction` (default 0.01) of the pairs quarantined fails the job, nothing written.

Class space: the ground truth's manifest (else the prediction's). `--classes` names the space to
score in: required when neither manifest names one, and converts COCO label maps explicitly
between coco91 (category ids) and coco81 (contiguous); any other mismatch is refused.
IoU_c = TP / (TP + FP + FN) over pixels whose GT is not 255; mIoU = nan-mean over the classes of
`--average-over` (default: every class of the space; classes absent from both GT and prediction,
such as coco91's 10 unused ids, have no IoU and drop out). The output says which space and how
many classes were averaged.

Prints a per-class table (or, with `--json`, the metrics as JSON) on stdout; progress goes to
stderr. `--output` also writes an `evaluate` stage directory: `metrics.json`,
`quarantine/evaluate.parquet`, `manifest.json` (with the metrics), `_SUCCESS`, and the
stage's report `report/index.html` (per-class IoU, confusion heatmap, worst/best/sampled images).
Exit status: 0 success; 1 failure (also: no image had both a prediction and ground truth, or
the error gate failed); 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from pipelines import cli as job
from pipelines.evaluate import EvaluateConfig, run_evaluate
from pipelines.evaluate.stage import (
    TooManyErrors,
    add_options,
    check_inputs,
    config_fields,
    print_metrics,
)
from pipelines.report.run import write_stage_report

DEFAULT_RESOURCES = job.Resources(num_cpus_per_task=0.5)  # light numpy work: room for Ray Data


def build_parser() -> argparse.ArgumentParser:
    parser, stage = job.job_parser("jobs.evaluate", __doc__, "evaluate options")
    add_options(parser, stage)
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = job.stage_options(args, "evaluate", DEFAULT_RESOURCES)
    config = job.build_config(EvaluateConfig, args, config_fields(args))
    pred, gt, output = check_inputs(options, args.gt, config)  # before Ray starts
    job.init_ray(args)
    try:
        metrics = run_evaluate(
            pred, gt, output, config, report=job.to_stderr, **job.stage_kwargs(options)
        )
    except TooManyErrors as refused:
        print_metrics(refused.metrics, as_json=args.json)
        print(f"error: {refused}", file=sys.stderr)
        return 1
    if options.output is not None and metrics.get("images"):  # committed
        page = write_stage_report(options.output, storage=options.storage, report=job.to_stderr)
        job.to_stderr(f"evaluate: report {page}")
    return print_metrics(metrics, as_json=args.json)


main, cli = job.entry_points(_main)

if __name__ == "__main__":
    cli()
