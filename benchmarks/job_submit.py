"""Pseudo masks inside `ray job submit` beside the same stage run directly, on one cluster.

A private one-node Ray cluster on loopback (`ray start --head`, `--cpus` CPUs; `tests.ray_head`)
and one input: `--num-images` synthetic images (240 x 320, like the demo) as an ingest output and
a randomly initialised `tiny` model as train's `model.pt` (`benchmarks.pseudo_masks`'s writers:
random weights cost what trained ones do). Then, `--repeats` times in turn, each into a fresh
local output:

(a) direct: `python -m jobs.pseudo_masks ... --ray-address <head>`, a driver on this machine
    attached to the cluster;
(b) submitted: `ray job submit --working-dir <repo> -- python -m jobs.pseudo_masks ...`, the
    driver inside the cluster's job (the working dir uploaded and unpacked: the runtime env);
(c) local: `python -m jobs.pseudo_masks ...` on its own local Ray instance of `--cpus` CPUs.

Per run: the command's wall seconds and the stage's pipeline seconds (the `elapsed` of its last
progress line: the Ray Data pipeline from the first row to the last). The goal (issue 15): (b)
within 1.5x of (a), wall to wall.

    python -m benchmarks.job_submit [--num-images 24] [--cpus 2] [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.pseudo_masks import write_checkpoint, write_input
from pipelines.io.storage import resolve
from tests.proc import run_logged, tail
from tests.ray_head import ray_head, submit_job

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200
# the stage's last progress line: "pseudo_masks: 24/24 images (100%), ..., 31 s elapsed"
LAST_LINE = re.compile(r"pseudo_masks: (\d+)/\1 images \(100%\).*?, ([0-9hms ]+) elapsed")


def _seconds(text: str) -> float:
    """Seconds of `pipelines.progress.format_duration`'s `42 s` / `2m09s` / `1h04m`."""
    parts = dict((unit, int(n)) for n, unit in re.findall(r"(\d+) ?([hms])", text))
    return 3600 * parts.get("h", 0) + 60 * parts.get("m", 0) + parts.get("s", 0)


def _result(kind: str, wall: float, log: str, returncode: int) -> dict[str, Any]:
    if returncode != 0:
        raise RuntimeError(f"({kind}) exited {returncode}:\n{tail(log)}")
    found = LAST_LINE.findall(log)
    return {
        "kind": kind,
        "wall_s": wall,
        "images": int(found[-1][0]) if found else None,
        "pipeline_s": _seconds(found[-1][1]) if found else None,
    }


def run(args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """The input, then (a), (b), (c) `--repeats` times in turn: one row per run."""
    source, checkpoint = os.path.join(root, "ingest"), os.path.join(root, "model.pt")
    write_input(resolve(source), args.num_images, height=240, width=320)
    write_checkpoint(checkpoint, "tiny")
    rows: list[dict[str, Any]] = []
    with ray_head(num_cpus=args.cpus) as cluster:
        for repeat in range(args.repeats):

            def stage(kind: str, repeat: int = repeat) -> list[str]:
                output = os.path.join(root, f"pseudo-{kind}-{repeat}")
                argv = ["-m", "jobs.pseudo_masks", "--input", source, "--output", output]
                return [*argv, "--checkpoint", checkpoint]

            started = time.perf_counter()
            direct = [sys.executable, *stage("direct"), "--ray-address", cluster.address]
            done = run_logged(direct, env=cluster.env, timeout_s=TIMEOUT_S, cwd=REPO)
            rows.append(_result("direct", time.perf_counter() - started, *_out(done)))
            started = time.perf_counter()
            done = submit_job(
                cluster, ["python", *stage("submit")], working_dir=REPO, timeout_s=TIMEOUT_S
            )
            rows.append(_result("submit", time.perf_counter() - started, *_out(done)))
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            started = time.perf_counter()
            local = [sys.executable, *stage("local")]
            done = run_logged(local, env=env, timeout_s=TIMEOUT_S, cwd=REPO)
            rows.append(_result("local", time.perf_counter() - started, *_out(done)))
            for row in rows[-3:]:
                print(
                    f"repeat {repeat}: ({row['kind']}) {row['wall_s']:.1f} s wall, "
                    f"pipeline {row['pipeline_s']} s"
                )
    return rows


def _out(done: Any) -> tuple[str, int]:
    return done.stdout, done.returncode


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best wall and pipeline seconds per kind, and submit / direct."""
    best = {}
    for kind in ("direct", "submit", "local"):
        mine = [r for r in rows if r["kind"] == kind]
        best[kind] = {
            "wall_s": min(r["wall_s"] for r in mine),
            "pipeline_s": min(r["pipeline_s"] or float("inf") for r in mine),
        }
    ratio = best["submit"]["wall_s"] / best["direct"]["wall_s"]
    return {"best": best, "submit_vs_direct": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the cluster's head node")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary dir)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        rows = run(args, args.workdir or tmp)
    summary = summarise(rows)
    load_after = os.getloadavg()
    print()
    print(f"{'run':<22}{'best wall s':>12}{'pipeline s':>12}")
    names = {"direct": "(a) direct", "submit": "(b) ray job submit", "local": "(c) local Ray"}
    for kind, best in summary["best"].items():
        print(f"{names[kind]:<22}{best['wall_s']:>12.1f}{best['pipeline_s']:>12.0f}")
    print(
        f"submit / direct: {summary['submit_vs_direct']:.2f}x (goal <= 1.5x); {args.num_images} "
        f"images; load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    if args.json:
        meta = {"python": platform.python_version(), "loadavg": [load_before, load_after]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "runs": rows, **summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
