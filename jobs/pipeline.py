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

from pipelines import cli as job
from pipelines.pipeline import PipelineConfig, add_options, config_fields, demo_data, run_pipeline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser)
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    demo, base = demo_data(args)
    config = job.build_config(PipelineConfig, args, config_fields(args), base=base)
    options = job.job_options(args)
    assert options.output is not None
    job.init_ray(args)
    run_pipeline(args.input, options.output.uri, config, demo=demo, storage=options.storage)
    return 0


main, cli = job.entry_points(_main)

if __name__ == "__main__":
    cli()
