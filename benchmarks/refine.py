"""Refine throughput: a plain single-process loop vs the refine stage, on the same images.

Input: N synthetic images of VOC size (375 x 500, 1-3 objects, so K = 2-4 CRF labels),
written once as an ingest output (JPEG images, float16 CAMs, PNG GT; row groups of
`--rows-per-group`, the stage's work unit). Then, in one process:

(a) loop: read the shards in this process and, per row, decode image and CAM and call
    `refine_seed` (the "bare CRF call"), one image after the other on one core;
(b) stage: `run_refine` on a private local Ray instance with `--cpus` CPUs (1 CPU per task),
    timed from the call to its return (manifest, shards and `_SUCCESS` written; Ray start-up
    excluded);
(d) joblib: what the upstream projects' `make_crf` does — the same decode + `refine_seed` + PNG
    encoding per image through `joblib.Parallel(n_jobs=P)` over worker processes on this machine
    (loky backend, worker start-up included), the rows read from the same shards by the parent;
    the stage must reach >= 0.95x its images/s on the same cores (`pip install -e '.[bench]'`);
(c) classes: `refine_seed` restricted to background + the image's classes vs the whole class
    space (the synthetic space's 7 classes and VOC's 21), median CPU time per image.

Overhead of the stage over the bare CRF call, with W = stage wall time, P = CPUs:
  pipeline overhead = (W x P - sum CRF_stage) / sum CRF_stage, sum CRF_stage = the summed wall time
      of `refine_seed` inside the stage's tasks: every CPU-second the stage held that was not
      spent in the CRF (Ray scheduling, start and tail idling, reads, decoding, argmax, PNG
      encoding, confusion matrices, writes, manifest), per CRF-second;
  vs loop CRF = (W x P - sum CRF_loop) / sum CRF_loop: the same against the CRF time measured in
      the plain loop (includes any slow-down of the CRF itself when P copies run at once);
  in-task overhead = (sum task wall - sum CRF_stage) / sum CRF_stage: per-row work in the tasks.

(b) and (d) run `--repeats` times, alternating (a slow spell of a shared machine hits both);
the run of median wall time of each is reported, with every run's wall time.

    python -m benchmarks.refine [--num-images 200] [--cpus 2] [--repeats 3] [--no-joblib]
        [--json FILE]

On a machine shared with other work, the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest.rows import SHARD_SCHEMA
from pipelines.io import schema
from pipelines.io.codecs import decode_cam_column, decode_rgb, encode_label_png
from pipelines.io.manifest import FileEntry, InputRef, StageOutput, read_manifest
from pipelines.io.storage import Location, resolve, write_bytes_atomic
from pipelines.refine import RefineConfig, run_refine
from pipelines.seeds import refine_seed
from pipelines.synthetic.dataset import ingest_row
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample

VOC_NUM_CLASSES = 21


def _row(index: int, height: int, width: int) -> dict[str, Any]:
    sample = generate_sample(index, seed=0, height=height, width=width)
    return ingest_row(sample, split="train", source=sample.image_id)


def write_input(
    loc: Location,
    num_images: int,
    *,
    height: int,
    width: int,
    rows_per_shard: int,
    rows_per_group: int,
) -> None:
    """The synthetic images as a committed ingest output (shards + manifest + _SUCCESS)."""
    out = StageOutput.open(
        loc, stage="ingest", config={"benchmark": num_images}, inputs=[InputRef("synthetic://0")]
    )
    files = []
    for number, start in enumerate(range(0, num_images, rows_per_shard)):
        rows = [
            _row(i, height, width) for i in range(start, min(start + rows_per_shard, num_images))
        ]
        table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=rows_per_group)
        rel = f"shards/part-{number:05d}.parquet"
        write_bytes_atomic(loc, rel, buffer.getvalue())
        files.append(FileEntry(rel, table.num_rows, len(buffer.getvalue())))
    out.commit(
        files=files,
        counts={"input": num_images, "output": num_images, "quarantined": 0},
        class_names=SYNTHETIC_CLASSES.class_names,
        class_space="custom",
    )


def _rows(loc: Location) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in read_manifest(loc).file_paths("shards/"):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def bench_loop(loc: Location, config: RefineConfig) -> dict[str, float]:
    """(a): decode + `refine_seed`, one image after the other in this process."""
    seed_config = config.seed_config()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    crf = 0.0
    rows = _rows(loc)
    for row in rows:
        height, width = row[schema.HEIGHT], row[schema.WIDTH]
        image = decode_rgb(row[schema.IMAGE], height=height, width=width)
        cams = decode_cam_column(row[schema.CAM], len(row[schema.CAM_CLASSES]), height, width)
        t0 = time.perf_counter()
        refine_seed(image, cams, row[schema.CAM_CLASSES], config=seed_config)
        crf += time.perf_counter() - t0
    wall = time.perf_counter() - start_wall
    return {
        "images": len(rows),
        "wall_s": wall,
        "cpu_s": time.process_time() - start_cpu,
        "crf_s": crf,
        "images_per_s": len(rows) / wall,
    }


def _crf_one(row: dict[str, Any], seed_config: Any, out_dir: str) -> float:
    """One image of (d): decode, `refine_seed`, PNG to `out_dir`; the CRF call's seconds."""
    height, width = row[schema.HEIGHT], row[schema.WIDTH]
    image = decode_rgb(row[schema.IMAGE], height=height, width=width)
    cams = decode_cam_column(row[schema.CAM], len(row[schema.CAM_CLASSES]), height, width)
    t0 = time.perf_counter()
    seed = refine_seed(image, cams, row[schema.CAM_CLASSES], config=seed_config)
    crf = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"{row[schema.IMAGE_ID]}.png"), "wb") as f:
        f.write(encode_label_png(seed))
    return crf


def bench_joblib(loc: Location, config: RefineConfig, cpus: int, out_dir: str) -> dict[str, Any]:
    """(d): upstream's `make_crf` pattern, `joblib.Parallel` over `cpus` processes."""
    from joblib import Parallel, delayed  # the `bench` extra

    seed_config = config.seed_config()
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    rows = _rows(loc)
    crf = Parallel(n_jobs=cpus)(delayed(_crf_one)(row, seed_config, out_dir) for row in rows)
    wall = time.perf_counter() - start
    return {
        "images": len(rows),
        "cpus": cpus,
        "wall_s": wall,
        "crf_s": float(sum(crf)),
        "images_per_s": len(rows) / wall,
    }


def bench_stage(loc: Location, out: Location, config: RefineConfig, cpus: int) -> dict[str, Any]:
    """(b): the refine stage on a private local instance with `cpus` CPUs."""
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        result = run_refine(loc.uri, out.uri, config, num_cpus_per_task=1.0, report=print)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    if not result.ok:
        raise RuntimeError(result.message)
    images = result.counts["output"]
    assert result.metrics is not None
    return {
        "images": images,
        "cpus": cpus,
        "wall_s": wall,
        "crf_s": result.crf_seconds,
        "task_s": result.task_seconds,
        "units": result.units_run,
        "images_per_s": images / wall,
        "cam_argmax_miou": result.metrics["cam_argmax"]["miou"],
        "seeds_miou": result.metrics["seeds"]["miou"],
    }


def _walls(run: dict[str, Any] | None) -> str:
    return "-" if run is None else ", ".join(f"{w:.1f}" for w in run["walls_s"])


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time (the lower one of an even count), with every run's walls."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[(len(ordered) - 1) // 2], "walls_s": [r["wall_s"] for r in runs]}


def bench_classes(loc: Location, config: RefineConfig, num_images: int) -> list[dict[str, Any]]:
    """(c): median CPU seconds per image, restricted vs the whole class space."""
    rows = _rows(loc)[:num_images]
    restricted = config.seed_config()
    variants = {
        "restricted": restricted,
        f"all {SYNTHETIC_CLASSES.num_classes}": replace(
            restricted, restrict_to_present=False, num_classes=SYNTHETIC_CLASSES.num_classes
        ),
        f"all {VOC_NUM_CLASSES} (VOC)": replace(
            restricted, restrict_to_present=False, num_classes=VOC_NUM_CLASSES
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    agree: dict[str, list[float]] = {name: [] for name in variants}
    ks = []
    for row in rows:
        height, width = row[schema.HEIGHT], row[schema.WIDTH]
        image = decode_rgb(row[schema.IMAGE], height=height, width=width)
        cams = decode_cam_column(row[schema.CAM], len(row[schema.CAM_CLASSES]), height, width)
        ks.append(1 + len(row[schema.CAM_CLASSES]))
        reference = None
        for name, seed_config in variants.items():
            t0 = time.process_time()
            seed = refine_seed(image, cams, row[schema.CAM_CLASSES], config=seed_config)
            times[name].append(time.process_time() - t0)
            reference = seed if reference is None else reference
            agree[name].append(float(np.mean(seed == reference)))
    base = statistics.median(times["restricted"])
    return [
        {
            "variant": name,
            "k": f"{min(ks)}-{max(ks)}" if name == "restricted" else name.split()[1],
            "median_cpu_s": statistics.median(t),
            "speedup_of_restricted": statistics.median(t) / base,
            "agree_with_restricted": float(np.mean(agree[name])),
        }
        for name, t in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray instance")
    parser.add_argument(
        "--rows-per-group",
        type=int,
        default=16,
        help="rows per row group of the ingest input it writes",
    )
    parser.add_argument("--method", choices=("weaktr", "clip-es"), default="weaktr")
    parser.add_argument(
        "--no-joblib", action="store_true", help="skip (d), the joblib.Parallel comparison"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of (b) and (d), alternating; medians kept"
    )
    parser.add_argument("--class-images", type=int, default=8, help="images for (c)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary dir)")
    args = parser.parse_args(argv)
    config = RefineConfig(method=args.method)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        source = resolve(os.path.join(root, "ingest"))
        t0 = time.perf_counter()
        write_input(
            source,
            args.num_images,
            height=args.height,
            width=args.width,
            rows_per_shard=max(args.rows_per_group, 64),
            rows_per_group=args.rows_per_group,
        )
        print(f"wrote {args.num_images} images in {time.perf_counter() - t0:.0f} s")
        loop = bench_loop(source, config)
        print(f"(a) loop: {loop['images_per_s']:.3f} images/s")
        stages, pools = [], []
        for i in range(args.repeats):  # alternating, so that a slow spell hits both
            out = resolve(os.path.join(root, f"refine-{i}"))
            stages.append(bench_stage(source, out, config, args.cpus))
            print(f"(b) stage, run {i + 1}: {stages[-1]['images_per_s']:.3f} images/s")
            if not args.no_joblib:
                joblib_dir = os.path.join(root, f"joblib-{i}")
                pools.append(bench_joblib(source, config, args.cpus, joblib_dir))
                print(f"(d) joblib, run {i + 1}: {pools[-1]['images_per_s']:.3f} images/s")
        stage, pool = _median_run(stages), _median_run(pools) if pools else None
        classes = bench_classes(source, config, args.class_images)
    load_after = os.getloadavg()
    cpus = stage["cpus"]
    summary = {
        "speedup": stage["images_per_s"] / loop["images_per_s"],
        "pipeline_overhead": (stage["wall_s"] * cpus - stage["crf_s"]) / stage["crf_s"],
        "overhead_vs_loop_crf": (stage["wall_s"] * cpus - loop["crf_s"]) / loop["crf_s"],
        "in_task_overhead": (stage["task_s"] - stage["crf_s"]) / stage["crf_s"],
        "crf_slowdown_in_stage": stage["crf_s"] / loop["crf_s"],
    }
    if pool is not None:
        summary["stage_vs_joblib"] = stage["images_per_s"] / pool["images_per_s"]
    print()
    print(
        f"{args.num_images} images {args.height}x{args.width}, method {args.method}, "
        f"input row groups of {args.rows_per_group} rows, {stage['units']} refine unit(s); "
        f"(b), (d): the median of {args.repeats} runs "
        f"(walls {_walls(stage)} / {_walls(pool)} s)"
    )
    print(f"{'':<26}{'wall s':>9}{'CRF s':>9}{'images/s':>10}")
    print(
        f"{'(a) single-process loop':<26}{loop['wall_s']:>9.1f}{loop['crf_s']:>9.1f}"
        f"{loop['images_per_s']:>10.3f}"
    )
    print(
        f"{f'(b) stage, {cpus} CPUs':<26}{stage['wall_s']:>9.1f}{stage['crf_s']:>9.1f}"
        f"{stage['images_per_s']:>10.3f}"
    )
    if pool is not None:
        print(
            f"{f'(d) joblib.Parallel, {cpus}':<26}{pool['wall_s']:>9.1f}{pool['crf_s']:>9.1f}"
            f"{pool['images_per_s']:>10.3f}"
        )
        print(f"stage / joblib: {summary['stage_vs_joblib']:.2f}x (goal >= 0.95x)")
    print(f"speed-up (b)/(a): {summary['speedup']:.2f}x (goal >= 1.7x on 2 cores)")
    print(
        f"pipeline overhead (W*P - sum CRF_stage)/sum CRF_stage: "
        f"{summary['pipeline_overhead']:+.1%} (goal <= 10%)"
    )
    print(
        f"  vs loop CRF time: {summary['overhead_vs_loop_crf']:+.1%}; in-task: "
        f"{summary['in_task_overhead']:+.1%}; CRF time in stage / in loop: "
        f"{summary['crf_slowdown_in_stage']:.2f}"
    )
    print(f"mIoU: CAM argmax {stage['cam_argmax_miou']:.4f}, seeds {stage['seeds_miou']:.4f}")
    print(f"{'(c) CRF classes':<26}{'K':>9}{'CPU s/img':>11}{'x restricted':>14}{'agree':>8}")
    for c in classes:
        print(
            f"{c['variant']:<26}{c['k']:>9}{c['median_cpu_s']:>11.3f}"
            f"{c['speedup_of_restricted']:>13.2f}x{c['agree_with_restricted']:>8.4f}"
        )
    print(
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
        f"({os.cpu_count()} CPUs visible)"
    )
    if args.json:
        doc = {
            "meta": {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus_visible": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
            "args": vars(args),
            "loop": loop,
            "stage": stage,
            "joblib": pool,
            "summary": summary,
            "classes": classes,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
