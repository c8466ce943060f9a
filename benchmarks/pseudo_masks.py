"""Pseudo-mask throughput: the model actors, the CRF stage and the whole stage, and actor memory.

Input: N synthetic images (default 240 x 320, like the demo) written once as an ingest output,
and a randomly initialised model of `--model` exported as train's `model.pt` (random weights
cost the same as trained ones); or an existing `--input` and `--checkpoint` (e.g. the demo's
refine and train outputs). Then `run_pseudo_masks` on a private local Ray instance with `--cpus`
CPUs (and the machine's GPUs, one per actor), timed from the call to its return (manifest,
masks, report and `_SUCCESS` written; Ray start-up excluded). Figures:

- actors: images / Σ model seconds per image inside the actors (decode, normalise, every
  scale x flip pass, float16 planes): the rate of one replica, and x pool size for the pool;
- CRF stage: images / Σ seconds per image inside the CRF tasks (decode, CRF, argmax, PNG
  encode; the mask write excluded): the rate of one task;
- end to end: images / stage wall time (includes actor start-up, the report and the manifest);
- memory: each actor's peak resident set (MB; plus peak CUDA allocation on GPU).

    python -m benchmarks.pseudo_masks [--num-images 24] [--model tiny|vit-b-16] [--cpus 2]
        [--scales 1.0] [--no-flip] [--no-crf] [--input URI --checkpoint URI] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest.rows import SHARD_SCHEMA
from pipelines.io.manifest import FileEntry, InputRef, StageOutput
from pipelines.io.storage import Location, resolve, write_bytes_atomic
from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks
from pipelines.synthetic.dataset import ingest_row
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample


def write_input(loc: Location, num_images: int, *, height: int, width: int) -> None:
    """N synthetic train images as a committed ingest output (row groups of 16 rows)."""
    out = StageOutput.open(
        loc, stage="ingest", config={"benchmark": num_images}, inputs=[InputRef("synthetic://0")]
    )
    rows = [
        ingest_row(generate_sample(i, seed=0, height=height, width=width), split="train")
        for i in range(num_images)
    ]
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=16)
    rel = "shards/part-00000.parquet"
    write_bytes_atomic(loc, rel, buffer.getvalue())
    out.commit(
        files=[FileEntry(rel, table.num_rows, len(buffer.getvalue()))],
        counts={"input": num_images, "output": num_images, "quarantined": 0},
        class_names=SYNTHETIC_CLASSES.class_names,
        class_space="custom",
    )


def write_checkpoint(path: str, model: str) -> None:
    """A randomly initialised `model` preset exported as train's model.pt."""
    import torch

    from pipelines.train.export import export_model
    from weakclip.build import build_weakclip
    from weakclip.config import preset

    torch.manual_seed(0)
    config = preset(model)
    export_model(
        path,
        model=build_weakclip(config, SYNTHETIC_CLASSES.class_names),
        config=config,
        class_names=SYNTHETIC_CLASSES.class_names,
        clip_source=None,
        clip_sha256="random",
        iteration=0,
    )


def bench(args: argparse.Namespace, input_uri: str, checkpoint: str, output: str) -> dict:
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        config = PseudoMaskConfig(
            scales=args.scales,
            flip=False if args.no_flip else None,
            use_crf=not args.no_crf,
            splits=None if args.all_splits else ("train",),
            report_images=args.report_images,
        )
        start = time.perf_counter()
        result = run_pseudo_masks(
            input_uri,
            output,
            checkpoint,
            config,
            actor_pool_size=args.actor_pool_size,
            cpus_per_actor=args.cpus_per_actor,
            num_cpus_per_task=args.num_cpus_per_task,
            report=print,
        )
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    if not result.ok:
        raise RuntimeError(result.message)
    images = result.images_run
    metrics = result.metrics or {}
    return {
        "images": images,
        "gpus": gpus,
        "wall_s": wall,
        "pipeline_s": result.pipeline_seconds,
        "infer_s": result.infer_seconds,
        "crf_s": result.crf_seconds,
        "actor_images_per_s": images / result.infer_seconds,
        "pool_images_per_s": args.actor_pool_size * images / result.infer_seconds,
        "crf_task_images_per_s": images / result.crf_seconds if result.crf_seconds else None,
        "end_to_end_images_per_s": images / wall,
        "actor_memory_mb": result.actor_memory_mb,
        "pseudo_masks_miou": (metrics.get("pseudo_masks") or {}).get("miou"),
        "baseline": {
            key: metrics[key]["miou"] for key in ("cam_argmax", "seeds") if key in metrics
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--model", choices=("tiny", "vit-b-16"), default="tiny")
    parser.add_argument("--input", help="an existing ingest/refine output instead of synthetic")
    parser.add_argument("--checkpoint", help="an existing model.pt instead of a random model")
    parser.add_argument("--all-splits", action="store_true", help="not just the train split")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray instance")
    parser.add_argument("--actor-pool-size", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--num-cpus-per-task", type=float, default=0.5)
    parser.add_argument(
        "--scales", type=lambda t: tuple(float(v) for v in t.split(",")), help="e.g. 0.75,1"
    )
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--no-crf", action="store_true")
    parser.add_argument("--report-images", type=int, default=8)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if (args.input is None) != (args.checkpoint is None):
        parser.error("give --input and --checkpoint together")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        input_uri, checkpoint = args.input, args.checkpoint
        if input_uri is None:
            t0 = time.perf_counter()
            input_uri = resolve(os.path.join(root, "ingest")).uri
            write_input(resolve(input_uri), args.num_images, height=args.height, width=args.width)
            checkpoint = os.path.join(root, f"{args.model}.pt")
            write_checkpoint(checkpoint, args.model)
            print(
                f"wrote {args.num_images} images and a {args.model} model in "
                f"{time.perf_counter() - t0:.0f} s"
            )
        output = os.path.join(root, f"pseudo-{time.time_ns()}")
        stage = bench(args, input_uri, checkpoint, output)
    load_after = os.getloadavg()
    print()
    where = "GPU" if stage["gpus"] else "CPU"
    print(
        f"{stage['images']} images, model {args.model if args.input is None else checkpoint}, "
        f"{args.cpus} CPUs, {stage['gpus']} GPUs, {args.actor_pool_size} actor(s) on {where}"
    )
    print(f"{'':<34}{'seconds':>9}{'images/s':>10}")
    print(
        f"{'model, one actor (Σ per image)':<34}{stage['infer_s']:>9.1f}"
        f"{stage['actor_images_per_s']:>10.2f}"
    )
    print(f"{'model, actor pool':<34}{'':>9}{stage['pool_images_per_s']:>10.2f}")
    crf_rate = stage["crf_task_images_per_s"]
    print(
        f"{'CRF stage, one task (Σ per image)':<34}{stage['crf_s']:>9.1f}"
        f"{crf_rate if crf_rate is not None else float('nan'):>10.2f}"
    )
    print(
        f"{'end to end (stage wall time)':<34}{stage['wall_s']:>9.1f}"
        f"{stage['end_to_end_images_per_s']:>10.2f}"
    )
    for actor, mb in sorted((stage["actor_memory_mb"] or {}).items()):
        print(f"actor {actor}: peak memory {mb:.0f} MB")
    if stage["pseudo_masks_miou"] is not None:
        base = ", ".join(f"{k} {v:.4f}" for k, v in stage["baseline"].items())
        print(f"mIoU: pseudo masks {stage['pseudo_masks_miou']:.4f}; {base}")
    print(
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
        f"({os.cpu_count()} CPUs visible)"
    )
    if args.json:
        doc: dict[str, Any] = {
            "meta": {
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus_visible": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
            "args": vars(args),
            "stage": stage,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
