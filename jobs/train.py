r"""Trains WeakCLIP on a refine output with Ray Train; writes model.pt, metrics and a manifest.

    python -m jobs.train --input s3://bucket/refine --output s3://bucket/train --model tiny \
        --iterations 200 --batch-size 4 --num-workers 2 [--clip-weights URI] [--resume]

`--config FILE` holds fields of `weakclip.config.WeakCLIPConfig` (e.g. `{"train": {"lr":
1e-3}}`); flags override it. Exit status: 0 success; 1 failure with a one-line reason on
stderr; 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import (
    UsageError,
    add_common_args,
    init_ray,
    job_options,
    load_config_file,
    reject_unused,
    run_job,
    storage_options,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train", description=__doc__.split("\n")[0]
    )
    add_common_args(parser, model=True)
    parser.add_argument("--iterations", type=int, metavar="N", help="optimizer steps in total")
    parser.add_argument("--num-workers", type=int, default=2, metavar="W", help="Ray Train workers")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        metavar="N",
        help="per-worker micro-batch; smaller than the worker's share means gradient accumulation",
    )
    parser.add_argument("--clip-weights", metavar="URI", help="CLIP weights file (default: random)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=1000, metavar="N")
    parser.add_argument("--log-every", type=int, default=50, metavar="N")
    parser.add_argument("--max-failures", type=int, default=3, metavar="N")
    parser.add_argument(
        "--cpus-per-worker", type=float, default=0.5, metavar="N", help="CPUs per training worker"
    )
    parser.add_argument("--crf-processes", type=int, metavar="N", help="CRF pool size per worker")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="gpu when the cluster has GPUs (auto)",
    )
    return parser


def _main(argv: list[str]) -> int:
    from pipelines.train import TrainJobConfig, TrainRefused, run_train
    from weakclip.config import WeakCLIPConfig, from_dict, preset

    args = build_parser().parse_args(argv)
    reject_unused(args, "train", "actor_pool_size")
    options = job_options(args)
    assert options.input is not None
    overrides: dict = {}
    if args.config:
        overrides = load_config_file(args.config, storage_options(args))
    train = dict(overrides.get("train") or {})
    if args.iterations is not None:
        train["iterations"] = args.iterations
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    if train:
        overrides = {**overrides, "train": train}
    try:
        model = from_dict(overrides, WeakCLIPConfig, base=preset(args.model or "tiny"))
        config = TrainJobConfig(
            input=options.input.uri,
            output=options.output.uri,
            model=model,
            num_workers=args.num_workers,
            micro_batch_size=args.micro_batch_size,
            clip_weights=args.clip_weights,
            resume=args.resume,
            overwrite=options.overwrite,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            max_failures=args.max_failures,
            use_gpu={"auto": None, "cpu": False, "gpu": True}[args.device],
            cpus_per_worker=args.cpus_per_worker,
            num_cpus_per_task=options.resources.num_cpus_per_task,
            crf_processes=args.crf_processes,
            storage=options.storage,
        )
    except ValueError as error:
        raise UsageError(f"config: {error}") from None
    init_ray(args)
    try:
        result = run_train(config)
    except TrainRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not result.skipped:
        print(
            f"trained {result.iterations - result.start_iteration} iterations "
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
