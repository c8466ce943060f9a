"""Stage overhead: train, retrain and pseudo masks beside the bare work they do, at two sizes.

One local Ray instance (`--cpus` CPUs, with its dashboard, as the jobs start it) runs, in order:

1. no-ops of what the stages run on Ray, each twice with the second kept (the first pays the
   instance's cold start): an empty `TorchTrainer.fit()` (the stages' workers, CPUs per worker
   and logging), the same fed a one-row-per-worker dataset that each worker iterates (the
   coordinator of Ray Data's streaming split, which the training stages' trainers start too:
   the no-op of their kind; the plain one is reported beside) and an empty `map_batches`
   through one actor (the pseudo-mask model's pool) over one row;
2. inputs: two synthetic datasets (`--small` and `--large` images, demo size 240 x 320) through
   `jobs.make_synthetic`, `jobs.ingest` and (large) `jobs.refine`;
3. each stage at two sizes through its job's `main(argv)`, as a user runs it: `jobs.train` for
   `--iterations` A and B, `jobs.pseudo_masks` on the small and the large input, `jobs.retrain`
   for `--retrain-iterations` A and B on the large input's pseudo masks (the demo's settings
   otherwise; a retraining step is ~0.05 s, so its sizes are far apart to rise above noise);
   the large runs' own logged step and data-wait seconds per iteration are reported beside;
4. the bare work without Ray, one torch thread per process (a worker's share), for the training
   stages as their 2 workers' steps side by side under gloo DDP (what they contend for on the
   same cores, the gradient all-reduce included; one process alone reported beside): a training
   step (`benchmarks.train_step`'s tiny-cpu case, the reference), a retraining step (the small
   DeepLabV3, the worker's batch, forward + loss + backward + AdamW) and, per image, the
   pseudo-mask model pass (`predict_probabilities`) and the CRF (`postprocess`).

From the two sizes (W = wall time of the job, n = iterations or images):
  per item = (W_B - W_A) / (n_B - n_A); start-up = W_A - n_A x per item;
  per-item overhead = per item / bare - 1, with bare = the step time (train, retrain: the
      workers step side by side) or, for pseudo masks, max(model s / actors, (model s + CRF s)
      / CPUs) per image: the time per image with every core busy;
  start-up beyond Ray = start-up - the no-op of the same kind.

Goals (issue 15): per-item overhead <= 20 % (train, retrain), <= 30 % (pseudo masks); start-up
beyond Ray <= 15 s.

    python -m benchmarks.stage_overhead [--cpus 2] [--iterations 20,200]
        [--retrain-iterations 40,600] [--small 12] [--large 48]
        [--stages train,pseudo_masks,retrain] [--json FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

STAGES = ("train", "pseudo_masks", "retrain")
HEIGHT, WIDTH = 240, 320  # the demo's image size
BARE_STEPS = 10


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# The timed stages always run afresh: with --workdir, an output of an earlier run would
# otherwise be "already complete" and time nothing (the inputs are reused).
FRESH = "--overwrite"


def _job(module: str, argv: Sequence[str]) -> float:
    """Wall seconds of `python -m jobs.<module> argv` run in this process (its output hidden);
    raises when it does not exit 0."""
    import importlib

    main = importlib.import_module(f"jobs.{module}").main
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"jobs.{module} {' '.join(argv)} exited {status}:\n{out.getvalue()}")
    return seconds


def noop_fit(
    workdir: str, *, num_workers: int, cpus_per_worker: float, with_data: bool = False
) -> float:
    """Seconds of an empty `TorchTrainer.fit()` shaped like the stages' trainers; `with_data`:
    fed a dataset of one row per worker, each worker iterating its shard (the coordinator of
    Ray Data's split the stages' trainers start too)."""
    import ray.data
    import ray.train
    import ray.train.torch

    def loop(_: dict[str, Any]) -> None:
        if with_data:
            for _ in ray.train.get_dataset_shard("train").iter_batches():
                pass

    trainer = ray.train.torch.TorchTrainer(
        loop,
        train_loop_config={},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name="noop",
            storage_path=tempfile.mkdtemp(prefix="noop-fit-", dir=workdir),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": ray.data.range(num_workers)} if with_data else None,
    )
    return _timed(trainer.fit)


class _Identity:
    """An actor doing nothing (the no-op of the pseudo-mask model pool)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


def noop_map_batches() -> float:
    """Seconds of an empty `map_batches` through one actor over one row."""
    import ray.data

    dataset = ray.data.from_items([{"x": 0}]).map_batches(
        _Identity, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_size=1
    )
    return _timed(dataset.materialize)


def bare_train_step(workers: int = 1) -> float:
    """Seconds of one worker's training step, `benchmarks.train_step --case tiny-cpu` (the
    reference; its own CRF pool, one torch thread): alone in a subprocess, or (`workers` > 1)
    in that many processes side by side under gloo DDP as the stage's workers run it, without
    Ray (rank 0's figure)."""
    if workers == 1:
        argv = [sys.executable, "-m", "benchmarks.train_step", "--case", "tiny-cpu"]
        done = subprocess.run([*argv, "--in-process"], capture_output=True, text=True, check=True)
        return float(json.loads(done.stdout.strip().splitlines()[-1])["step_s"])
    return _spawn(_train_steps, workers, {})


def _spawn(fn: Callable[..., None], workers: int, spec: dict[str, Any]) -> float:
    """Rank 0's seconds from `fn(rank, world, port, spec, result)` in `workers` processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "step_s")
        mp.spawn(fn, args=(workers, port, spec, result), nprocs=workers)
        with open(result) as f:
            return float(f.read())


def _process_group(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def _train_steps(rank: int, world: int, port: int, spec: dict[str, Any], result: str) -> None:
    """One process of `bare_train_step`: train_step's tiny-cpu case under gloo DDP."""
    import torch
    import torch.distributed as dist

    from benchmarks.train_step import run_case
    from pipelines.training.worker import wrap_ddp

    _process_group(rank, world, port)
    seconds = run_case("tiny-cpu", wrap=lambda m: wrap_ddp(m, torch.device("cpu"), world))
    if rank == 0:
        with open(result, "w") as f:
            f.write(str(seconds["step_s"]))
    dist.destroy_process_group()


def _retrain_steps(rank: int, world: int, port: int, spec: dict[str, Any], result: str) -> None:
    """One process of `bare_retrain_step`: the step under gloo DDP (world > 1), one thread."""
    import torch
    import torch.distributed as dist

    from pipelines.retrain.loop import masked_cross_entropy
    from pipelines.retrain.model import build_model, logits

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if world > 1:
        _process_group(rank, world, port)
    model = build_model(spec["architecture"], spec["classes"])
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, crop = spec["batch"], spec["crop"]
    images = torch.randn(batch, 3, crop, crop)
    masks = torch.randint(0, spec["classes"], (batch, crop, crop))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        masked_cross_entropy(logits(ddp, images), masks).backward()
        optimizer.step()

    for _ in range(2):
        step()
    seconds = _timed(lambda: [step() for _ in range(BARE_STEPS)]) / BARE_STEPS
    if rank == 0:
        with open(result, "w") as f:
            f.write(str(seconds))
    if world > 1:
        dist.destroy_process_group()


def bare_retrain_step(
    *, architecture: str, classes: int, batch: int, crop: int, workers: int
) -> float:
    """Seconds of a retraining step of `workers` processes side by side on random data (the
    worker's batch, one torch thread each, gloo DDP as in the stage; no Ray, no data)."""
    spec = {"architecture": architecture, "classes": classes, "batch": batch, "crop": crop}
    return _spawn(_retrain_steps, workers, spec)


def bare_pseudo_masks(checkpoint_uri: str, ingest_uri: str) -> dict[str, float]:
    """Mean seconds per image of the model pass and of the CRF over the rows of an ingest output
    the stage's default recipe (splits, scales, flip, CRF) would run, one torch thread."""
    import torch

    from pipelines.io import schema
    from pipelines.io.codecs import decode_rgb
    from pipelines.io.manifest import read_manifest
    from pipelines.io.storage import resolve
    from pipelines.pseudo_masks.checkpoint import build_model, verify_checkpoint
    from pipelines.pseudo_masks.config import PseudoMaskConfig
    from pipelines.pseudo_masks.infer import allowed_classes, predict_probabilities
    from pipelines.pseudo_masks.rows import in_splits, postprocess
    from pipelines.training.data import read_row_groups

    torch.set_num_threads(1)
    checkpoint = verify_checkpoint(checkpoint_uri)
    source = read_manifest(resolve(ingest_uri))
    recipe = PseudoMaskConfig()
    inference = recipe.inference(checkpoint.config.inference, source.class_space)
    model, config = build_model(checkpoint.data, sha256=checkpoint.sha256)
    num_classes = len(checkpoint.class_names)
    columns = (schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.LABELS, schema.SPLIT)
    rows = [row for _, _, t in read_row_groups(source, columns) for row in t.to_pylist()]
    rows = [row for row in rows if in_splits(row[schema.SPLIT], recipe.splits)]
    infer_s = crf_s = 0.0
    with torch.inference_mode():
        for row in rows:
            height, width = row[schema.HEIGHT], row[schema.WIDTH]
            image = decode_rgb(row[schema.IMAGE], height=height, width=width)
            classes = allowed_classes(
                row[schema.LABELS], num_classes, restrict=inference.restrict_to_image_classes
            )
            started = time.perf_counter()
            probs = predict_probabilities(
                lambda images: model(images).logits,
                image,
                classes,
                num_classes=num_classes,
                inference=inference,
                pixel_mean=tuple(config.clip.pixel_mean),
                pixel_std=tuple(config.clip.pixel_std),
                device=torch.device("cpu"),
            )
            infer_s += time.perf_counter() - started
            started = time.perf_counter()
            postprocess(image, probs, classes, crf=inference.crf)
            crf_s += time.perf_counter() - started
    return {"images": len(rows), "infer_s": infer_s / len(rows), "crf_s": crf_s / len(rows)}


def fit_line(sizes: Sequence[int], walls: Sequence[float]) -> tuple[float, float]:
    """(seconds per item, start-up seconds) of the line through two (size, wall) points."""
    (a, b), (wa, wb) = sizes, walls
    per_item = (wb - wa) / (b - a)
    return per_item, wa - a * per_item


def summarise(
    name: str, sizes: Sequence[int], walls: Sequence[float], bare: float, noop: float
) -> dict[str, Any]:
    """One stage's row: walls, per item, start-up, overhead ratios."""
    per_item, startup = fit_line(sizes, walls)
    return {
        "stage": name,
        "sizes": list(sizes),
        "wall_s": list(walls),
        "per_item_s": per_item,
        "bare_s": bare,
        "per_item_overhead": per_item / bare - 1,
        "startup_s": startup,
        "noop_s": noop,
        "startup_beyond_ray_s": startup - noop,
    }


def _inputs(root: str, small: int, large: int) -> dict[str, str]:
    paths = {}
    for name, count in (("small", small), ("large", large)):
        data, ingest = os.path.join(root, f"data-{name}"), os.path.join(root, f"ingest-{name}")
        argv = ["--output", data, "--num-images", str(count), "--seed", "0"]
        _job("make_synthetic", [*argv, "--height", str(HEIGHT), "--width", str(WIDTH)])
        _job("ingest", ["--input", data, "--output", ingest])
        paths[name] = ingest
    paths["refine"] = os.path.join(root, "refine")
    _job("refine", ["--input", paths["large"], "--output", paths["refine"]])
    return paths


def run(args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """Every asked stage at its two sizes, the no-ops and the bare work: the table's rows."""
    import ray

    from pipelines.pipeline import DEMO_CONFIG
    from pipelines.synthetic.shapes import SYNTHETIC_CLASSES

    iterations = [int(n) for n in args.iterations.split(",")]
    retrain_iterations = [int(n) for n in args.retrain_iterations.split(",")]
    stages = args.stages.split(",")
    demo, retrain = DEMO_CONFIG, DEMO_CONFIG["retrain"]
    workers = ["--num-workers", "2", "--log-every", "1000", "--checkpoint-every", "1000"]
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=True, log_to_driver=False)
    rows = []
    try:
        # Each no-op twice, the second kept: the first pays this instance's cold start (worker
        # processes, imports), which the stages, run later, mostly do not.
        shape = dict(num_workers=2, cpus_per_worker=0.5)
        bare_fit = [noop_fit(root, **shape) for _ in range(2)][-1]
        fit_noop = [noop_fit(root, **shape, with_data=True) for _ in range(2)][-1]
        map_noop = [noop_map_batches() for _ in range(2)][-1]
        print(
            f"no-ops: TorchTrainer.fit {bare_fit:.1f} s, with a dataset {fit_noop:.1f} s, "
            f"map_batches {map_noop:.1f} s"
        )
        paths = _inputs(root, args.small, args.large)
        train_args = ["--input", paths["refine"], "--model", demo["model"]]
        train_args += ["--batch-size", str(demo["batch_size"]), *workers]
        train_args += ["--config", _config_file(root, {"train": {"lr": demo["lr"]}})]
        walls = [
            _job(
                "train",
                [*train_args, "--output", f"{root}/train-{n}", "--iterations", str(n), FRESH],
            )
            for n in iterations
        ]
        checkpoint = f"{root}/train-{iterations[-1]}/model.pt"
        if "train" in stages:
            row = summarise("train", iterations, walls, bare_train_step(workers=2), fit_noop)
            logged = _logged(f"{root}/train-{iterations[-1]}")
            one = {"bare_one_process_s": bare_train_step(), "noop_plain_s": bare_fit}
            rows.append({**row, **logged, **one})
            print(f"train: {walls}")
        masks = {}
        for name in ("small", "large"):
            masks[name] = f"{root}/pseudo-{name}"
            argv = [
                "--input",
                paths[name],
                "--output",
                masks[name],
                "--checkpoint",
                checkpoint,
                FRESH,
            ]
            masks[f"{name}_s"] = _job("pseudo_masks", argv)
        if "pseudo_masks" in stages:
            bare = bare_pseudo_masks(checkpoint, paths["small"])
            per_image = max(bare["infer_s"], (bare["infer_s"] + bare["crf_s"]) / args.cpus)
            walls = [masks["small_s"], masks["large_s"]]
            row = summarise("pseudo_masks", [args.small, args.large], walls, per_image, map_noop)
            rows.append({**row, "bare_model_s": bare["infer_s"], "bare_crf_s": bare["crf_s"]})
            print(f"pseudo masks: {walls}")
        if "retrain" in stages:
            retrain_args = ["--input", masks["large"], "--architecture", retrain["architecture"]]
            retrain_args += ["--batch-size", str(retrain["batch_size"]), *workers]
            retrain_args += ["--crop-size", str(retrain["crop_size"]), "--lr", str(retrain["lr"])]
            walls = [
                _job(
                    "retrain",
                    [
                        *retrain_args,
                        "--output",
                        f"{root}/retrain-{n}",
                        "--iterations",
                        str(n),
                        FRESH,
                    ],
                )
                for n in retrain_iterations
            ]
            spec = dict(
                architecture=retrain["architecture"],
                classes=SYNTHETIC_CLASSES.num_classes,
                batch=retrain["batch_size"] // 2,
                crop=retrain["crop_size"],
            )
            bare = bare_retrain_step(**spec, workers=2)
            row = summarise("retrain", retrain_iterations, walls, bare, fit_noop)
            row["bare_one_process_s"] = bare_retrain_step(**spec, workers=1)
            row["noop_plain_s"] = bare_fit
            rows.append({**row, **_logged(f"{root}/retrain-{retrain_iterations[-1]}")})
            print(f"retrain: {walls}")
    finally:
        ray.shutdown()
    return rows


def _logged(output: str) -> dict[str, float]:
    """The run's own per-iteration figures (its last logged row: a window over every step of
    rank 0 with `--log-every` past the end): step seconds and data-wait seconds."""
    if os.path.exists(path := os.path.join(output, "metrics.jsonl")):  # train
        with open(path) as f:
            last = json.loads(f.read().splitlines()[-1])
    else:  # retrain: metrics.json's history
        with open(os.path.join(output, "metrics.json")) as f:
            last = json.load(f)["history"][-1]
    return {"logged_step_s": last["step_s"], "logged_data_wait_s": last["data_wait_s"]}


def _config_file(root: str, fields: dict[str, Any]) -> str:
    path = os.path.join(root, "train-config.json")
    with open(path, "w") as f:
        json.dump(fields, f)
    return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The printed table, one row per stage."""
    head = (
        f"{'stage':<14}{'sizes':>10}{'wall s':>14}{'per item s':>12}{'bare s':>9}"
        f"{'overhead':>10}{'start-up s':>12}{'no-op s':>9}{'beyond':>8}{'logged step/wait s':>20}"
    )
    lines = [head]
    for r in rows:
        sizes = "/".join(str(s) for s in r["sizes"])
        walls = "/".join(f"{w:.0f}" for w in r["wall_s"])
        lines.append(
            f"{r['stage']:<14}{sizes:>10}{walls:>14}{r['per_item_s']:>12.3f}{r['bare_s']:>9.3f}"
            f"{r['per_item_overhead']:>+10.0%}{r['startup_s']:>12.1f}{r['noop_s']:>9.1f}"
            f"{r['startup_beyond_ray_s']:>8.1f}"
            + (
                f"{r['logged_step_s']:>13.3f}/{r['logged_data_wait_s']:.3f}"
                if "logged_step_s" in r
                else ""
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray instance")
    parser.add_argument("--iterations", default="20,200", help="train sizes A,B")
    parser.add_argument("--retrain-iterations", default="40,600", help="retrain sizes A,B")
    parser.add_argument("--small", type=int, default=12, help="pseudo-mask images, size A")
    parser.add_argument("--large", type=int, default=48, help="pseudo-mask images, size B")
    parser.add_argument("--stages", default=",".join(STAGES), help="of " + ",".join(STAGES))
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary dir)")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    pairs = (args.iterations, args.retrain_iterations)
    if unknown or any(len(p.split(",")) != 2 for p in pairs) or args.small >= args.large:
        parser.error(f"--stages of {STAGES}, two sizes each, --small < --large ({unknown})")
    load_before = os.getloadavg()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, args.workdir or tmp)
    load_after = os.getloadavg()
    print()
    print(format_table(rows))
    for r in rows:
        extra = []
        if "noop_plain_s" in r:
            extra.append(f"no-op without a dataset {r['noop_plain_s']:.1f} s")
        if "bare_one_process_s" in r:
            extra.append(f"bare step of one process alone {r['bare_one_process_s']:.3f} s")
        if extra:
            print(f"{r['stage']}: " + "; ".join(extra))
    print(
        "goals: overhead <= +20% (train, retrain), <= +30% (pseudo masks); beyond <= 15 s; "
        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} ({os.cpu_count()} CPUs)"
    )
    if args.json:
        meta = {"python": platform.python_version(), "cpus_visible": os.cpu_count()}
        doc = {"meta": {**meta, "loadavg": [load_before, load_after]}, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({**doc, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
