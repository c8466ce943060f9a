"""Writes the synthetic WSSS dataset (images, CAMs, labels, GT) to a storage URI.

    python -m jobs.make_synthetic --output s3://bucket/synthetic --num-images 64 --seed 0

Families (`pipelines.synthetic.dataset`): `shapes` (six custom classes, each its own colour, at
--height x --width), `camouflage` (VOC or COCO-91 classes told apart by shape and texture only,
VOC-like sizes drawn per image) and `colours` (camouflage scenes, each class its own colour).
"""

from __future__ import annotations

import argparse

from pipelines.cli import UsageError, entry_points, given, storage_options
from pipelines.cli.options import resolve_arg
from pipelines.synthetic import dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_synthetic", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--output", required=True, help="s3://bucket/prefix, file:///dir or path")
    add("--num-images", type=int, required=True)
    add("--seed", type=int, required=True)
    add("--height", type=int, default=320, help="shapes family only")
    add("--width", type=int, default=448, help="shapes family only")
    add("--family", choices=dataset.FAMILIES, default="shapes")
    add("--classes", choices=tuple(dataset.CAMO_CLASS_SPACES), help="their class space (voc)")
    add("--val-fraction", type=float, default=0.25)
    add("--layout", choices=("mctformer", "clip-es"), default="mctformer")
    add("--workers", type=int, default=2, help="generating processes")
    add("--storage-endpoint", default=None, help="S3-compatible endpoint URL")
    kinds = ", ".join(dataset.BAD_INPUTS)
    add("--plant-bad-inputs", dest="bad", action="store_true", help=f"shapes: add {kinds}")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.num_images < 1 or args.seed < 0 or min(args.height, args.width) < 32:
        raise UsageError("need --num-images >= 1, --seed >= 0 and --height/--width >= 32")
    if not 0 <= args.val_fraction < 1 or args.workers < 1:
        raise UsageError("need 0 <= --val-fraction < 1 and --workers >= 1")
    if args.family == "shapes" and args.classes is not None:
        raise UsageError("--classes applies to --family camouflage or colours only")
    if args.family != "shapes" and args.bad:
        raise UsageError("--plant-bad-inputs applies to --family shapes only")
    location = resolve_arg("--output", args.output, storage_options(args))
    names = ("num_images", "seed", "height", "width", "val_fraction", "layout", "workers")
    fs, root = location.fs, location.path
    written = dataset.write_dataset(fs, root, **given(args, *names, "family", "classes"))
    planted = dataset.plant_bad_inputs(fs, root, layout=args.layout) if args.bad else {}
    bad = f" and {len(planted)} bad rows" if planted else ""
    counts = f"{len(written.train_ids)} train + {len(written.val_ids)} val images{bad}"
    print(f"wrote {counts} to {location.uri}")
    return 0


main, cli = entry_points(_main)

if __name__ == "__main__":
    cli()
