"""Writes the synthetic WSSS dataset (images, CAMs, labels, GT) to a storage URI.

    python -m jobs.make_synthetic --output s3://bucket/synthetic --num-images 64 --seed 0
    python -m jobs.make_synthetic --output out/camo --num-images 40 --seed 0 \
        --family camouflage --classes coco91

Families: `shapes` (six custom classes, each its own colour, at --height x --width),
`camouflage` (VOC or COCO-91 class ids told apart by shape and texture only, in shared colours,
VOC-like sizes drawn per image: --height/--width do not apply) and `colours` (the camouflage
scenes with each class in its own colour: colour-separable, in the VOC or COCO-91 space).

Exit status: 0 success; 1 failure with a one-line reason on stderr; 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import UsageError, run_job
from pipelines.io.storage import StorageOptions, resolve
from pipelines.synthetic.dataset import (
    BAD_INPUTS,
    CAMO_CLASS_SPACES,
    FAMILIES,
    plant_bad_inputs,
    write_dataset,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_synthetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", required=True, help="s3://bucket/prefix, file:///dir or path")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--height", type=int, default=320, help="shapes family only")
    parser.add_argument("--width", type=int, default=448, help="shapes family only")
    parser.add_argument("--family", choices=FAMILIES, default="shapes")
    parser.add_argument(
        "--classes",
        choices=tuple(CAMO_CLASS_SPACES),
        default=None,
        help="class space of the camouflage and colours families (default voc)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--layout", choices=("mctformer", "clip-es"), default="mctformer")
    parser.add_argument("--workers", type=int, default=2, help="generating processes")
    parser.add_argument("--storage-endpoint", default=None, help="S3-compatible endpoint URL")
    parser.add_argument(
        "--plant-bad-inputs",
        dest="bad",
        action="store_true",
        help=f"also add one defective row of each kind ({', '.join(BAD_INPUTS)}); shapes only",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The job's parser (the name `jobs.options_doc` looks for)."""
    return _parser()


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.num_images < 1 or args.seed < 0 or min(args.height, args.width) < 32:
        raise UsageError("need --num-images >= 1, --seed >= 0 and --height/--width >= 32")
    if not 0 <= args.val_fraction < 1 or args.workers < 1:
        raise UsageError("need 0 <= --val-fraction < 1 and --workers >= 1")
    if args.family == "shapes" and args.classes is not None:
        raise UsageError("--classes applies to --family camouflage or colours only")
    if args.family != "shapes" and args.bad:
        raise UsageError("--plant-bad-inputs applies to --family shapes only")
    try:
        location = resolve(args.output, StorageOptions(endpoint_url=args.storage_endpoint))
    except ValueError as error:
        raise UsageError(f"--output: {error}") from None
    written = write_dataset(
        location.fs,
        location.path,
        num_images=args.num_images,
        seed=args.seed,
        height=args.height,
        width=args.width,
        val_fraction=args.val_fraction,
        layout=args.layout,
        workers=args.workers,
        family=args.family,
        classes=args.classes,
    )
    planted = plant_bad_inputs(location.fs, location.path, layout=args.layout) if args.bad else {}
    bad = f" and {len(planted)} bad rows" if planted else ""
    print(
        f"wrote {len(written.train_ids)} train + {len(written.val_ids)} val images{bad} "
        f"to {location.uri}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the job; returns 0 on success, 1 on failure (one line on stderr), 2 on usage."""
    return run_job(_main, argv)


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
