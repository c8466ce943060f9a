"""How much restricting the dense CRF to the present classes saves (docs/METHOD.md).

Seed refinement: `refine_seed` on VOC-size (375 x 500) synthetic images with 1-3 foreground
classes (K = 2-4 CRF labels with background), restricted vs the whole 21-class VOC space, for
both recipes. Training loss: the 64 x 64 boundary CRF with K = 21 vs restricted to K = 3.
Times are medians of process CPU time on one core (pydensecrf is single-threaded), so other
load on a shared machine matters less; "agree" is the fraction of pixels where the restricted
and the 21-class result have the same label.

    python -m benchmarks.crf_classes [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from pipelines.seeds import SeedConfig, refine_seed
from weakclip.crf import boundary_crf_target

VOC_CLASSES = 21
COLOURS = [(200, 40, 40), (40, 160, 60), (50, 60, 200), (220, 200, 50)]


def _blur(x: np.ndarray, radius: int, passes: int = 3) -> np.ndarray:
    for axis in (0, 1):
        for _ in range(passes):
            pad = [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)]
            c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis)
            n = c.shape[axis]
            x = (
                np.take(c, range(2 * radius + 1, n), axis=axis)
                - np.take(c, range(0, n - 2 * radius - 1), axis=axis)
            ) / (2 * radius + 1)
    return x


def synthetic_image(
    num_objects: int, *, height: int = 375, width: int = 500, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, lightly noisy scene with `num_objects` coloured ellipses and blurred CAMs.

    Returns:
        image H x W x 3 uint8 and cams C x H x W float32 in [0, 1] (C = num_objects), each CAM
        covering the central part of its object and bleeding past its edge.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 60 + 80 * (yy / height)[..., None] + 40 * (xx / width)[..., None] * np.array([1, 0.5, 0])
    image = base + rng.normal(0, 6, (height, width, 3))
    cams = []
    for i in range(num_objects):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.12, 0.25) * height, rng.uniform(0.1, 0.2) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = np.array(COLOURS[i % len(COLOURS)]) + rng.normal(0, 8, (inside.sum(), 3))
        core = ((yy - cy) / (0.7 * ry)) ** 2 + ((xx - cx) / (0.7 * rx)) ** 2 <= 1
        cam = _blur(core.astype(np.float64), 12)
        cams.append((cam - cam.min()) / (cam.max() - cam.min()))
    return np.clip(image, 0, 255).astype(np.uint8), np.stack(cams).astype(np.float32)


def _median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median process CPU time of `fn` (robust to other processes on a shared machine)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def bench_seeds(repeats: int) -> list[dict]:
    rows = []
    for method in ("weaktr", "clip-es"):
        for num_objects in (1, 2, 3):
            image, cams = synthetic_image(num_objects, seed=num_objects)
            classes = list(range(1, 1 + num_objects))
            restricted = SeedConfig.for_method(method)  # type: ignore[arg-type]
            full = SeedConfig.for_method(
                method,  # type: ignore[arg-type]
                restrict_to_present=False,
                num_classes=VOC_CLASSES,
            )
            t_r, seed_r = _median_seconds(
                partial(refine_seed, image, cams, classes, config=restricted), repeats
            )
            t_f, seed_f = _median_seconds(
                partial(refine_seed, image, cams, classes, config=full), repeats
            )
            rows.append(
                {
                    "case": f"seed {method}",
                    "size": f"{image.shape[0]}x{image.shape[1]}",
                    "k_restricted": 1 + num_objects,
                    "k_full": VOC_CLASSES,
                    "restricted_s": t_r,
                    "full_s": t_f,
                    "speedup": t_f / t_r,
                    "agree": float(np.mean(seed_r == seed_f)),
                }
            )
    return rows


def bench_boundary(repeats: int, batch: int = 16) -> dict:
    """A batch of 64 x 64 boundary-loss CRFs, K = 21 vs restricted to background + 2 classes."""
    rng = np.random.default_rng(0)
    images, probs, masks = [], [], []
    for i in range(batch):
        image, cams = synthetic_image(2, height=64, width=64, seed=100 + i)
        logits = np.full((VOC_CLASSES, 64, 64), -12.0)
        logits[0] = 1.0 + rng.normal(0, 0.5, (64, 64))
        logits[[3, 8]] = 3 * cams - 0.5 + rng.normal(0, 0.5, (2, 64, 64))
        p = np.exp(logits - logits.max(0))
        images.append(image)
        probs.append((p / p.sum(0)).astype(np.float32))
        mask = np.zeros(VOC_CLASSES, bool)
        mask[[0, 3, 8]] = True
        masks.append(mask)

    def run(restrict: bool) -> np.ndarray:
        return np.stack(
            [
                boundary_crf_target(im, p, m if restrict else None)
                for im, p, m in zip(images, probs, masks, strict=True)
            ]
        )

    t_r, q_r = _median_seconds(lambda: run(True), repeats)
    t_f, q_f = _median_seconds(lambda: run(False), repeats)
    return {
        "case": "boundary loss CRF",
        "size": "64x64",
        "k_restricted": 3,
        "k_full": VOC_CLASSES,
        "restricted_s": t_r / batch,
        "full_s": t_f / batch,
        "speedup": t_f / t_r,
        "agree": float(np.mean(np.asarray(q_r).argmax(1) == np.asarray(q_f).argmax(1))),
        "max_abs_q_diff": float(np.abs(np.asarray(q_r) - np.asarray(q_f)).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the CRF runs
    rows = bench_seeds(args.repeats) + [bench_boundary(args.repeats)]
    header = f"{'case':<20}{'size':>9}{'K':>5}{'time':>10}{'K=21':>10}{'speedup':>9}{'agree':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['case']:<20}{r['size']:>9}{r['k_restricted']:>5}"
            f"{r['restricted_s'] * 1e3:>8.1f}ms{r['full_s'] * 1e3:>8.1f}ms"
            f"{r['speedup']:>8.2f}x{r['agree']:>8.4f}"
        )
    if args.json:
        meta = {"python": platform.python_version(), "machine": platform.machine()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "repeats": args.repeats, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
