"""Ingest throughput and memory against a loopback S3 server, side by side in one run.

For each dataset size N: a synthetic dataset is written to a local `rclone serve s3`, then
(a) a plain single-process s3fs loop reads the same objects the ingest job reads (image, CAM,
GT of every id, one GET at a time) and (b) the ingest job (`pipelines.ingest.run_ingest`, a new
local Ray instance with `--cpus` CPUs) reads, validates and writes Parquet shards back to S3.
Each size runs in its own subprocess, and the job runs as its own driver process in it, so the
driver's peak RSS is the job's alone (data generation and the plain loop excluded);
worker peak RSS is the largest VmHWM of any `ray::` process seen while the job ran (Linux).
Memory must stay flat as N grows (streaming): compare the rows of the two sizes.

    python -m benchmarks.ingest --num-images 1000 5000 [--height 160 --width 224] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULT_PREFIX = "RESULT "


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class WorkerMemory:
    """Polls `/proc` for `ray::` worker processes and keeps their largest peak RSS."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmd = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if cmd.startswith(b"ray::"):
                    peak = _peak_rss_mib(int(entry.name))
                    if peak:
                        self.peak_mib = max(self.peak_mib, peak)


def run_job(data_uri: str, cpus: int) -> dict:
    """The ingest job alone, in this (fresh) process: wall time and this driver's peak RSS."""
    import ray

    from pipelines.ingest import IngestConfig, run_ingest

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        result = run_ingest(
            data_uri,
            "s3://bench/ingest",
            IngestConfig(splits=("train.txt", "val.txt")),
            report=lambda _: None,
        )
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert result.ok, result
    return {
        "seconds": seconds,
        "output": result.counts["output"],
        "driver_peak_rss_mib": round(_peak_rss_mib(os.getpid()) or 0.0, 1),
    }


def run_one(num_images: int, height: int, width: int, cpus: int) -> dict:
    """One size, in this process: generate, plain loop, ingest job. Returns the figures."""
    from pipelines.io.storage import resolve
    from pipelines.synthetic.dataset import write_dataset
    from tests.s3server import S3Server

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench-access",
            "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        server = S3Server(
            Path(tmp) / "s3", access_key="bench-access", secret_key="bench-secret-key"
        )
        server.start()
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
        try:
            server.make_bucket("bench")
            data = resolve("s3://bench/data")
            t0 = time.perf_counter()
            written = write_dataset(
                data.fs, data.path, num_images=num_images, seed=0, height=height, width=width
            )
            generate_s = time.perf_counter() - t0

            # (a) plain loop: the same objects, one GET at a time in one process
            ids = list(written.train_ids) + list(written.val_ids)
            fs = data.fs
            fs.invalidate_cache()
            t0 = time.perf_counter()
            loop_bytes = 0
            for image_id in ids:
                for rel in (
                    f"JPEGImages/{image_id}.jpg",
                    f"cams/{image_id}.npy",
                    f"SegmentationClassAug/{image_id}.png",
                ):
                    loop_bytes += len(fs.cat_file(data.join(rel)))
            loop_s = time.perf_counter() - t0

            # (b) the ingest job, as its own driver process on a fresh local Ray instance
            with WorkerMemory() as workers:
                job = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.ingest",
                        "--job",
                        data.uri,
                        "--cpus",
                        str(cpus),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                    env=os.environ.copy(),
                )
            lines = [x for x in job.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
            if job.returncode or not lines:
                raise RuntimeError(f"ingest job failed: {job.stderr[-2000:]}")
            job_result = json.loads(lines[-1][len(RESULT_PREFIX) :])
            assert job_result["output"] == num_images, job_result
            job_s = job_result["seconds"]
        finally:
            server.stop()
    return {
        "num_images": num_images,
        "image_size": [height, width],
        "generate_s": round(generate_s, 2),
        "input_mb": round(loop_bytes / 1e6, 2),
        "loop_s": round(loop_s, 2),
        "loop_images_per_s": round(num_images / loop_s, 2),
        "loop_mb_per_s": round(loop_bytes / 1e6 / loop_s, 2),
        "job_s": round(job_s, 2),
        "job_images_per_s": round(num_images / job_s, 2),
        "job_mb_per_s": round(loop_bytes / 1e6 / job_s, 2),
        "job_vs_loop": round(loop_s / job_s, 2),
        "driver_peak_rss_mib": job_result["driver_peak_rss_mib"],
        "worker_peak_rss_mib": round(workers.peak_mib, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--height", type=int, default=160)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size
    parser.add_argument("--job", help=argparse.SUPPRESS)  # grandchild mode: the job alone
    args = parser.parse_args(argv)
    if args.job is not None:
        print(RESULT_PREFIX + json.dumps(run_job(args.job, args.cpus)))
        return 0
    if args.one is not None:
        print(RESULT_PREFIX + json.dumps(run_one(args.one, args.height, args.width, args.cpus)))
        return 0
    rows = []
    for n in args.num_images:
        cmd = [sys.executable, "-m", "benchmarks.ingest", "--one", str(n)]
        cmd += ["--height", str(args.height), "--width", str(args.width), "--cpus", str(args.cpus)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
        if out.returncode or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][len(RESULT_PREFIX) :]))
    header = (
        f"{'images':>7} {'MB':>7} {'loop img/s':>11} {'loop MB/s':>10} {'job img/s':>10} "
        f"{'job MB/s':>9} {'job/loop':>9} {'driver MiB':>11} {'worker MiB':>11}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['num_images']:>7} {r['input_mb']:>7.1f} {r['loop_images_per_s']:>11.1f} "
            f"{r['loop_mb_per_s']:>10.2f} {r['job_images_per_s']:>10.1f} {r['job_mb_per_s']:>9.2f} "
            f"{r['job_vs_loop']:>8.2f}x {r['driver_peak_rss_mib']:>11.0f} "
            f"{r['worker_peak_rss_mib']:>11.0f}"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"(loopback rclone S3, {args.cpus} Ray CPUs, {machine})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
