"""Quality of the whole chain with the demo's settings on each synthetic data family.

    python -m benchmarks.quality --output outputs/quality --num-images 60 --json quality.json

For every family (`--family`, default all five): writes a dataset with `jobs.make_synthetic`,
runs `python -m jobs.pipeline --input ... --demo-settings` on it in its own process (its own
local Ray instance, as a user would), and prints one table: CAM argmax, CRF seeds and pseudo
masks (train split), the retrained model (val split), the pseudo masks' gain over the seeds,
foreground classes of the train split whose pseudo-mask IoU is 0, and seconds (the pipeline
job, data generation excluded).

Families:
- `shapes-voc-size`: the project's first generator (six custom classes, each its own colour)
  at 375 x 500;
- `camouflage-voc`, `camouflage-coco91`: the second, independent generator (classes share
  colours and differ by shape and texture, camouflaged backgrounds, VOC-like sizes) in the VOC
  21-class and COCO 91-id spaces;
- `colours-voc`, `colours-coco91`: the camouflage scenes with each class in its own colour (the
  colour-separable counterpart in the same class spaces and sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """How to write one family's dataset and which ingest class space reads it."""

    name: str
    synthetic_args: tuple[str, ...]  # jobs.make_synthetic options besides output/size/seed
    classes: str | None  # jobs.pipeline --classes; None: the dataset's classes.txt


FAMILIES = {
    f.name: f
    for f in (
        Family("shapes-voc-size", ("--height", "375", "--width", "500"), None),
        Family("camouflage-voc", ("--family", "camouflage", "--classes", "voc"), "voc"),
        Family("camouflage-coco91", ("--family", "camouflage", "--classes", "coco91"), "coco91"),
        Family("colours-voc", ("--family", "colours", "--classes", "voc"), "voc"),
        Family("colours-coco91", ("--family", "colours", "--classes", "coco91"), "coco91"),
    )
}


def _run(argv: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} exited {done.returncode}; see {log}")
    return time.monotonic() - started


def _zero_iou_classes(run: Path) -> list[str]:
    """Foreground classes of the masks' images whose pseudo-mask IoU is 0 (evaluate stage)."""
    manifest = json.loads((run / "evaluate" / "manifest.json").read_text())
    per_class = (manifest.get("metrics") or {}).get("per_class_iou") or {}
    return sorted(name for name, iou in per_class.items() if iou == 0 and name != "background")


def measure(family: Family, *, output: Path, num_images: int, seed: int) -> dict[str, Any]:
    """Writes the family's dataset, runs the chain on it and returns its row of the table."""
    data, run = output / family.name / "data", output / family.name / "run"
    python = sys.executable
    if not (data / "train.txt").exists():
        _run(
            [python, "-m", "jobs.make_synthetic", "--output", str(data),
             "--num-images", str(num_images), "--seed", str(seed), *family.synthetic_args],
            output / family.name / "make_synthetic.log",
        )  # fmt: skip
    argv = [
        python, "-m", "jobs.pipeline", "--input", str(data), "--output", str(run),
        "--split", "train=train.txt", "--split", "val=val.txt", "--demo-settings",
    ]  # fmt: skip
    if family.classes:
        argv += ["--classes", family.classes]
    seconds = _run(argv, output / family.name / "pipeline.log")
    summary = json.loads((run / "summary.json").read_text())
    return {
        "family": family.name,
        "cam_argmax": summary["cam_argmax"],
        "crf_seeds": summary["crf_seeds"],
        "pseudo_masks": summary["pseudo_masks"],
        "retrained": summary["retrained"],
        "zero_iou_classes": _zero_iou_classes(run),
        "seconds": round(seconds, 1),
        "stage_seconds": summary.get("seconds"),
    }


def _pct(value: float | None) -> str:
    return "   -" if value is None else f"{100 * value:5.1f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table `main` prints."""
    lines = [
        f"{'family':20s} {'CAM':>5s} {'seeds':>5s} {'masks':>5s} {'gain':>5s} {'retr.':>5s} "
        f"{'s':>6s}  zero-IoU classes",
    ]
    for r in rows:
        gain = None
        if r["pseudo_masks"] is not None and r["crf_seeds"] is not None:
            gain = r["pseudo_masks"] - r["crf_seeds"]
        lines.append(
            f"{r['family']:20s} {_pct(r['cam_argmax'])} {_pct(r['crf_seeds'])} "
            f"{_pct(r['pseudo_masks'])} {_pct(gain)} {_pct(r['retrained'])} "
            f"{r['seconds']:6.0f}  {', '.join(r['zero_iou_classes']) or '-'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", default="outputs/quality", help="a local directory")
    parser.add_argument(
        "--family", action="append", choices=sorted(FAMILIES), help="default: every family"
    )
    parser.add_argument("--num-images", type=int, default=60, help="train + val (25%% val)")
    parser.add_argument("--seed", type=int, default=1, help="dataset seed")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    rows = []
    for name in args.family or list(FAMILIES):
        (output / name).mkdir(parents=True, exist_ok=True)
        print(f"{name}: running (log: {output / name / 'pipeline.log'})", flush=True)
        rows.append(measure(FAMILIES[name], output=output, num_images=args.num_images,
                            seed=args.seed))  # fmt: skip
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    raise SystemExit(main())
