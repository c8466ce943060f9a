r"""Pseudo masks: a trained WeakCLIP (train's model.pt) run over an ingest or refine output.

    python -m jobs.pseudo_masks --input s3://bucket/run/refine \
        --checkpoint s3://bucket/run/train/model.pt --output s3://bucket/run/pseudo_masks \
        [--scales 0.5,1,1.5] [--no-flip] [--no-restrict] [--no-crf] [--splits train|all] \
        [--actor-pool-size 2] [--config pseudo.yaml]

Multi-scale + flip sliding-window inference in a fixed pool of model replicas (one GPU each
when the cluster has GPUs), restricted to background + each image's classes, then dense-CRF
post-processing on CPU tasks. `--config FILE` holds fields of
`pipelines.pseudo_masks.PseudoMaskConfig` (e.g. `bilateral_sxy`, `crf_iterations`); flags
override it. The checkpoint is loaded with `torch.load(weights_only=True)` before Ray starts;
anything else is refused. Exit status: 0 success; 1 failure with a one-line reason on stderr;
2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pipelines.cli import (
    Resources,
    UsageError,
    add_common_args,
    build_config,
    init_ray,
    job_options,
    run_job,
)
from pipelines.io.manifest import read_manifest
from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks
from pipelines.pseudo_masks.checkpoint import verify_checkpoint
from pipelines.pseudo_masks.stage import check_class_names

# One model replica on 1 CPU; CRF tasks on half a CPU: on 2 cores both stages run at once.
DEFAULT_RESOURCES = Resources(num_cpus_per_task=0.5, actor_pool_size=1)


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one scale")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.pseudo_masks", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_common_args(parser)
    stage = parser.add_argument_group("pseudo-mask options")
    stage.add_argument(
        "--checkpoint", required=True, metavar="URI", help="train's model.pt (s3://, file://)"
    )
    stage.add_argument(
        "--scales", type=_scales, metavar="S,S,...", help="default: the checkpoint preset's"
    )
    stage.add_argument("--no-flip", action="store_true", help="no mirrored passes")
    stage.add_argument(
        "--no-restrict", action="store_true", help="all classes, not just the image's labels"
    )
    stage.add_argument("--no-crf", action="store_true", help="argmax without CRF")
    stage.add_argument(
        "--splits", metavar="S,S|all", help="splits to process (default train; all = every row)"
    )
    stage.add_argument("--report-images", type=int, metavar="N", help="images in report/ (8)")
    stage.add_argument(
        "--max-error-fraction",
        type=float,
        metavar="F",
        help="fail when more than this share of rows is quarantined (default 0.01)",
    )
    stage.add_argument(
        "--cpus-per-actor", type=float, default=1.0, metavar="N", help="CPUs per model replica"
    )
    stage.add_argument(
        "--device", choices=("auto", "cpu", "gpu"), default="auto", help="gpu when present (auto)"
    )
    stage.add_argument("--progress-every", type=int, metavar="N", help="a line every N images")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.progress_every is not None and args.progress_every < 1:
        raise UsageError("--progress-every: must be at least 1")
    if args.cpus_per_actor <= 0:
        raise UsageError("--cpus-per-actor: must be positive")
    splits = None
    if args.splits is not None and args.splits != "all":
        splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    overrides = {
        "scales": args.scales,
        "flip": False if args.no_flip else None,
        "restrict_to_image_classes": False if args.no_restrict else None,
        "use_crf": False if args.no_crf else None,
        "report_images": args.report_images,
        "max_error_fraction": args.max_error_fraction,
    }
    if args.splits is not None:
        overrides["splits"] = splits
    config = build_config(PseudoMaskConfig, args, overrides)
    if args.splits == "all":  # build_config skips None overrides: "all" is set here
        config = dataclasses.replace(config, splits=None)
    options = job_options(args, DEFAULT_RESOURCES)
    assert options.input is not None
    # Everything that can be refused is refused before Ray starts: an unfinished input, an
    # unsafe or foreign checkpoint, a class-space mismatch.
    source = read_manifest(options.input)
    checkpoint = verify_checkpoint(args.checkpoint, options.storage)
    check_class_names(source, checkpoint)
    init_ray(args)
    result = run_pseudo_masks(
        options.input.uri,
        options.output.uri,
        checkpoint,
        config,
        storage=options.storage,
        actor_pool_size=options.resources.actor_pool_size,
        cpus_per_actor=args.cpus_per_actor,
        num_cpus_per_task=options.resources.num_cpus_per_task,
        batch_size=options.resources.batch_size,
        use_gpu={"auto": None, "cpu": False, "gpu": True}[args.device],
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
