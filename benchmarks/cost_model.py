"""Plan a run before paying for it: per-item costs measured here, and the hours they add up to.

Measured on this machine, one core (process CPU time, the median of `--repeats`):

1. the dense CRF of a seed (refine's recipe, `pipelines.seeds.refine_seed`) per image at each
   `--sizes` and K = background + 1..3 classes, fitted as seconds = c + pixels x (a + b x K); the
   pseudo-mask post-processing CRF is the same 10-iteration dense CRF at the same size and K;
2. one 512 x 512 window of each `--models` preset (random weights cost what trained ones do;
   one torch thread), times `weakclip.inference.window_equivalents` of the paper's 12-pass
   recipe (6 scales x flip, windows cut to small images) at each dataset's image size;
3. bytes per image of an ingest row (encoded image, float16 CAM planes, GT PNG; zstd Parquet
   as ingest writes it), per column from the Parquet footer, on synthetic images of each size.

Then, with the formulas of docs/SCALING.md, hours and node-hours of each stage for VOC
train_aug (10,582 images) and COCO train (82,081) on `cluster.yaml`'s node types. Training
time comes from `--train-images-per-s` (images per second per GPU; default the paper's 16.8,
not measured here) and the paper's schedule (VOC 20k x 16, COCO 40k x 24 images).

    python -m benchmarks.cost_model [--sizes 240x320,375x500,480x640] [--models tiny,vit-b-16]
        [--repeats 3] [--train-images-per-s 16.8] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.crf_classes import synthetic_image

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dataset:
    """What a dataset's cost depends on: images, a typical size, labels per image."""

    name: str
    images: int  # training images (what refine and pseudo masks run on)
    height: int
    width: int
    classes_per_image: float  # mean image-level labels (K = this + 1 with the background)
    train_images: int  # iterations x global batch of the paper's schedule


DATASETS = (
    Dataset("VOC train_aug", 10_582, 375, 500, 1.5, 20_000 * 16),
    Dataset("COCO train", 82_081, 480, 640, 2.9, 40_000 * 24),
)
REFINE_OVERHEAD = 0.12  # the refine stage beyond its CRF calls (benchmarks.refine, 2 cores)


def _median_cpu_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def crf_costs(sizes: Sequence[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    """Seconds of refine's CRF per image at each size and K = 2..4."""
    from pipelines.seeds import SeedConfig, refine_seed

    config = SeedConfig()
    rows = []
    for height, width in sizes:
        for objects in (1, 2, 3):
            image, cams = synthetic_image(objects, height=height, width=width, seed=objects)
            classes = list(range(1, objects + 1))
            seconds = _median_cpu_s(
                lambda i=image, c=cams, k=classes: refine_seed(i, c, k, config=config), repeats
            )
            rows.append({"height": height, "width": width, "k": objects + 1, "crf_s": seconds})
    return rows


def fit_crf(rows: Sequence[dict[str, Any]]) -> tuple[float, float, float]:
    """(c, a, b) of seconds = c + pixels x (a + b x K), least squares over the measured rows."""
    pixels = np.array([r["height"] * r["width"] for r in rows], dtype=np.float64)
    k = np.array([r["k"] for r in rows], dtype=np.float64)
    design = np.stack([np.ones_like(pixels), pixels, pixels * k], axis=1)
    (c, a, b), *_ = np.linalg.lstsq(design, np.array([r["crf_s"] for r in rows]), rcond=None)
    return float(c), float(a), float(b)


def crf_seconds(fit: tuple[float, float, float], pixels: float, k: float) -> float:
    """The fitted CRF seconds of an image of `pixels` pixels and K labels."""
    c, a, b = fit
    return c + pixels * (a + b * k)


def window_costs(models: Sequence[str], repeats: int) -> dict[str, float]:
    """Seconds of one 512 x 512 window through each preset (eval, one thread)."""
    import torch

    from weakclip.build import build_weakclip
    from weakclip.config import preset

    torch.set_num_threads(1)
    names = ("background", "aeroplane", "bicycle", "bird")
    found = {}
    for name in models:
        model = build_weakclip(preset(name), names).eval()
        window = torch.randn(1, 3, 512, 512)
        with torch.inference_mode():
            model(window)  # warm-up
            found[name] = _median_cpu_s(lambda m=model, w=window: m(w), repeats)
    return found


def row_bytes(sizes: Sequence[tuple[int, int]], rows: int = 8) -> list[dict[str, Any]]:
    """Bytes per ingest row by column (Parquet footer, zstd as ingest writes), per size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.ingest.rows import SHARD_SCHEMA
    from pipelines.io import schema
    from pipelines.synthetic.dataset import ingest_row
    from pipelines.synthetic.shapes import generate_sample

    found = []
    for height, width in sizes:
        samples = [generate_sample(i, seed=0, height=height, width=width) for i in range(rows)]
        table = pa.Table.from_pylist(
            [ingest_row(s, split="train") for s in samples], schema=SHARD_SCHEMA
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        meta = pq.ParquetFile(io.BytesIO(buffer.getvalue())).metadata.row_group(0)
        by_column = {
            meta.column(i).path_in_schema: meta.column(i).total_compressed_size
            for i in range(meta.num_columns)
        }
        planes = sum(len(s.labels) for s in samples)
        found.append(
            {
                "height": height,
                "width": width,
                "image_b": by_column[schema.IMAGE] / rows,
                "gt_b": by_column[schema.GT] / rows,
                "cam_plane_b": by_column[schema.CAM] / planes,
                "cam_plane_raw_b": 2 * height * width,
                "row_b": len(buffer.getvalue()) / rows,
            }
        )
    return found


def node_types(path: Path = REPO / "cluster.yaml") -> dict[str, dict[str, Any]]:
    """{type: {"instance", "cpus", "gpus", "max_workers"}} of the cluster file's worker types."""
    import yaml

    config = yaml.safe_load(path.read_text())
    return {
        name: {
            "instance": spec["node_config"]["InstanceType"],
            "cpus": int(spec["resources"].get("CPU", 0)),
            "gpus": int(spec["resources"].get("GPU", 0)),
            "max_workers": int(spec.get("max_workers", 0)),
        }
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def plan(
    dataset: Dataset,
    *,
    crf_fit: tuple[float, float, float],
    window_s: float,
    bytes_row: dict[str, Any],
    nodes: dict[str, dict[str, Any]],
    train_images_per_s: float,
) -> dict[str, Any]:
    """The formulas of docs/SCALING.md for one dataset on the CPU and GPU worker types."""
    from weakclip.inference import window_equivalents

    cpu = next(n for n in nodes.values() if n["gpus"] == 0)
    gpu = next(n for n in nodes.values() if n["gpus"] > 0)
    pixels, k = dataset.height * dataset.width, dataset.classes_per_image + 1
    crf_s = crf_seconds(crf_fit, pixels, k)
    windows = window_equivalents(dataset.height, dataset.width, pad_small=False)
    cores = cpu["cpus"] * cpu["max_workers"]
    refine_h = dataset.images * crf_s * (1 + REFINE_OVERHEAD) / cores / 3600
    model_cpu_h = dataset.images * windows * window_s / cores / 3600  # on the CPU nodes
    crf_post_h = dataset.images * crf_s / cores / 3600
    gpus = gpu["gpus"] * gpu["max_workers"]
    train_h = dataset.train_images / (train_images_per_s * gpus) / 3600
    scale = pixels / (bytes_row["height"] * bytes_row["width"])  # bytes grow with the pixels
    planes = dataset.classes_per_image  # one CAM plane per image-level class
    ingest_b = (
        bytes_row["image_b"] + bytes_row["gt_b"] + bytes_row["cam_plane_b"] * planes
    ) * scale
    return {
        "dataset": dataset.name,
        "images": dataset.images,
        "size": f"{dataset.height}x{dataset.width}",
        "k": k,
        "crf_s_per_image": crf_s,
        "model_window_equivalents": windows,
        "model_s_per_image_cpu": windows * window_s,
        "cpu_nodes": f"{cpu['max_workers']} x {cpu['instance']} ({cpu['cpus']} CPUs)",
        "gpu_nodes": f"{gpu['max_workers']} x {gpu['instance']} ({gpu['gpus']} GPU)",
        "refine_h": refine_h,
        "refine_node_h": refine_h * cpu["max_workers"],
        "pseudo_masks_cpu_h": model_cpu_h + crf_post_h,
        "pseudo_masks_cpu_node_h": (model_cpu_h + crf_post_h) * cpu["max_workers"],
        "train_h": train_h,
        "train_node_h": train_h * gpu["max_workers"],
        "ingest_gb": dataset.images * ingest_b / 1e9,
    }


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_sizes, default=_sizes("240x320,375x500,480x640"))
    parser.add_argument("--models", default="tiny,vit-b-16", help="presets whose window to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--train-images-per-s", type=float, default=16.8, help="per GPU")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    crf = crf_costs(args.sizes, args.repeats)
    crf_fit = fit_crf(crf)
    windows = window_costs(args.models.split(","), args.repeats)
    sizes = row_bytes(args.sizes)
    nodes = node_types()
    print(f"{'size':>9} {'K':>3} {'CRF s':>7} {'fit s':>7}")
    for r in crf:
        fitted = crf_seconds(crf_fit, r["height"] * r["width"], r["k"])
        print(f"{r['height']}x{r['width']:<5} {r['k']:>3} {r['crf_s']:>7.3f} {fitted:>7.3f}")
    c, a, b = crf_fit
    print(f"CRF fit: s = {c:.4f} + pixels x ({a:.3e} + {b:.3e} x K)")
    for name, seconds in windows.items():
        print(f"model window 512 x 512, {name}: {seconds:.3f} s (one thread)")
    print(f"{'size':>9} {'image KB':>9} {'GT KB':>7} {'CAM plane KB':>13} {'(raw)':>7}")
    for r in sizes:
        print(
            f"{r['height']}x{r['width']:<5} {r['image_b'] / 1e3:>9.1f} {r['gt_b'] / 1e3:>7.1f} "
            f"{r['cam_plane_b'] / 1e3:>13.1f} {r['cam_plane_raw_b'] / 1e3:>7.0f}"
        )
    model = "vit-b-16" if "vit-b-16" in windows else next(iter(windows))
    plans = []
    for dataset in DATASETS:
        nearest = min(
            sizes, key=lambda r: abs(r["height"] * r["width"] - dataset.height * dataset.width)
        )
        plans.append(
            plan(
                dataset,
                crf_fit=crf_fit,
                window_s=windows[model],
                bytes_row=nearest,
                nodes=nodes,
                train_images_per_s=args.train_images_per_s,
            )
        )
    print(f"\nplan ({model}; cluster.yaml; train at {args.train_images_per_s} images/s per GPU):")
    for p in plans:
        print(
            f"{p['dataset']}: {p['images']} images {p['size']}, K {p['k']:.1f}: "
            f"CRF {p['crf_s_per_image']:.2f} s/image, model {p['model_window_equivalents']:.1f} "
            f"windows = {p['model_s_per_image_cpu']:.1f} CPU-s/image\n"
            f"  refine {p['refine_h']:.2f} h "
            f"({p['refine_node_h']:.1f} node-h on {p['cpu_nodes']}); "
            f"pseudo masks on CPUs {p['pseudo_masks_cpu_h']:.1f} h "
            f"({p['pseudo_masks_cpu_node_h']:.0f} node-h); "
            f"train {p['train_h']:.1f} h ({p['train_node_h']:.1f} node-h on {p['gpu_nodes']}); "
            f"ingest output ~{p['ingest_gb']:.0f} GB"
        )
    print(f"({platform.machine()}, {os.cpu_count()} cores; one core used)")
    if args.json:
        doc = {"crf": crf, "crf_fit": crf_fit, "window_s": windows, "bytes": sizes, "plans": plans}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
