r"""Retrain a fully supervised DeepLabV3 on pseudo masks with Ray Train; score it on val GT.

    python -m jobs.retrain --input s3://bucket/run/pseudo_masks --output s3://bucket/run/retrain \
        [--architecture small|resnet50|resnet101|mobilenet_v3_large] [--backbone-weights URI] \
        [--iterations N] [--batch-size N] [--crop-size S] [--num-workers W] [--resume] \
        [--wait-timeout SECONDS] [--config retrain.yaml]

Waits up to `--wait-timeout` seconds for the pseudo-mask output's `_SUCCESS`, reads only the
files its manifest (and its input's manifest) lists, and writes `model.pt`, `metrics.json`
(val mIoU on images never trained on), `quarantine/` for unusable masks, the manifest and
`_SUCCESS`. `--config FILE` holds fields of `pipelines.retrain.RetrainConfig`; flags override
it. Exit status: 0 success; 1 failure with a one-line reason on stderr; 2 usage error.
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
from pipelines.retrain import RetrainConfig, RetrainOptions, run_retrain
from pipelines.retrain.model import ARCHITECTURES
from pipelines.retrain.stage import micro_batching, read_inputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.retrain", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_common_args(parser)
    stage = parser.add_argument_group("retrain options")
    stage.add_argument("--architecture", choices=ARCHITECTURES, help="network (default small)")
    stage.add_argument(
        "--backbone-weights", metavar="URI", help="backbone weights file (default: random init)"
    )
    stage.add_argument("--iterations", type=int, metavar="N", help="optimizer steps in total")
    stage.add_argument("--lr", type=float, metavar="LR", help="AdamW peak learning rate")
    stage.add_argument("--crop-size", type=int, metavar="S", help="square training crop side")
    stage.add_argument("--num-workers", type=int, default=2, metavar="W", help="Ray Train workers")
    stage.add_argument(
        "--micro-batch-size",
        type=int,
        metavar="N",
        help="per-worker micro-batch; smaller than the worker's share means gradient accumulation",
    )
    stage.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    stage.add_argument("--checkpoint-every", type=int, default=500, metavar="N")
    stage.add_argument("--log-every", type=int, default=50, metavar="N")
    stage.add_argument("--max-failures", type=int, default=3, metavar="N")
    stage.add_argument(
        "--cpus-per-worker", type=float, default=0.5, metavar="N", help="CPUs per training worker"
    )
    stage.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="gpu when the cluster has GPUs (auto)",
    )
    stage.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for the input's _SUCCESS (default 600; 0 = check once)",
    )
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = build_config(
        RetrainConfig,
        args,
        {
            "architecture": args.architecture,
            "backbone_weights": args.backbone_weights,
            "iterations": args.iterations,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "crop_size": args.crop_size,
        },
    )
    options = job_options(args)
    assert options.input is not None
    try:
        run_options = RetrainOptions(
            num_workers=args.num_workers,
            micro_batch_size=args.micro_batch_size,
            resume=args.resume,
            overwrite=options.overwrite,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            max_failures=args.max_failures,
            use_gpu={"auto": None, "cpu": False, "gpu": True}[args.device],
            cpus_per_worker=args.cpus_per_worker,
            num_cpus_per_task=options.resources.num_cpus_per_task,
            wait_timeout_s=args.wait_timeout,
        )
        micro_batching(config, run_options)
    except ValueError as error:
        raise UsageError(f"config: {error}") from None
    # Wait for (and check) the input before Ray starts.
    read_inputs(options.input.uri, storage=options.storage, wait_timeout_s=args.wait_timeout)
    init_ray(args)
    result = run_retrain(
        options.input.uri,
        options.output.uri,
        config,
        options=run_options,
        storage=options.storage,
    )
    if not result.skipped:
        print(
            f"retrained {result.iterations - result.start_iteration} iterations "
            f"({result.start_iteration} -> {result.iterations}); wrote {options.output.uri}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(_main, argv)


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
