"""Throughput of the real per-worker training step, CRF pool included, beside the paper.

One step is exactly what a Ray Train worker runs (`pipelines.train.loop._micro_step`):
forward (bf16 autocast on CUDA), P to the CRF pool, seeding + auxiliary losses and their
output gradients while the pool works, the boundary loss when Q is back, one backward pass,
AdamW. Inputs are synthetic tensors already in memory (the Ray Data side is measured by the
`data_wait_s` column of a real run's metrics.jsonl, not here). Reported per worker: images/s,
peak memory (CPU: the process's peak RSS; CUDA: `max_memory_allocated`), and the share of step
time spent blocked on the CRF pool. Paper (WeakCLIP, one GPU): 16.8 images/s, 9.7 GiB.

    python -m benchmarks.train_step [--case tiny-cpu|vit-b-16-cuda|all] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from typing import Any

PAPER_IMAGES_PER_S = 16.8
PAPER_MEMORY_GIB = 9.7
VOC_NAMES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()
CASES = {
    # name: (preset, device, per-worker batch, CRF processes, timed steps)
    "tiny-cpu": ("tiny", "cpu", 2, 1, 10),
    "vit-b-16-cuda": ("vit-b-16", "cuda", 8, 8, 20),
}


def run_case(name: str, wrap: Any = None) -> dict:
    """Times the training step of one case in this process; `wrap(model)` wraps the model as
    the stage's workers do (default `NoSync`, one process; e.g. `wrap_ddp` under a process
    group)."""
    import numpy as np
    import torch

    from pipelines.train.crf_pool import CRFPool, crf_params
    from pipelines.train.loop import _micro_step
    from pipelines.training.worker import NoSync
    from weakclip.build import build_weakclip
    from weakclip.config import preset

    preset_name, device_name, batch, processes, steps = CASES[name]
    config = preset(preset_name)
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one training worker's share on a small machine
    pool = CRFPool(
        processes=processes,
        params=crf_params(config.loss.boundary_crf, prob_floor=config.loss.prob_clamp),
    )
    torch.manual_seed(0)
    model = build_weakclip(config, VOC_NAMES).to(device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    wrapped = (wrap or NoSync)(model)
    size, res = config.clip.input_size, config.loss.resolution
    rng = np.random.default_rng(0)
    classes = len(VOC_NAMES)

    def make_batch() -> dict:
        seeds = rng.integers(0, 4, (batch, size, size)).astype(np.uint8)
        masks = np.zeros((batch, classes), bool)
        masks[:, :4] = True
        return {
            "image": torch.randn(batch, 3, size, size),
            "seed": torch.from_numpy(seeds),
            "crf_image": torch.from_numpy(rng.integers(0, 256, (batch, res, res, 3), np.uint8)),
            "class_mask": torch.from_numpy(masks),
        }

    class Feed:
        wait_seconds = 0.0

        def next(self) -> dict:
            return make_batch()

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _micro_step(wrapped, make_batch(), Feed(), pool, config, device, autocast, res, 1)
        optimizer.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wait0 = pool.wait_seconds
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    elapsed = time.perf_counter() - start
    wait = pool.wait_seconds - wait0
    pool.close()
    return {
        "case": name,
        "input_size": size,
        "batch_per_worker": batch,
        "crf_processes": processes,
        "images_per_s": batch * steps / elapsed,
        "step_s": elapsed / steps,
        "peak_memory_gib": peak / 2**30,
        "crf_wait_share": wait / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        print(json.dumps(run_case(args.case)))
        return 0
    import torch

    names = list(CASES) if args.case == "all" else [args.case]
    names = [n for n in names if CASES[n][1] != "cuda" or torch.cuda.is_available()]
    results = []
    for name in names:  # one process per case, so peak memory is the case's own
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.train_step", "--case", name, "--in-process"],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    header = f"{'case':<15}{'size':>6}{'batch':>7}{'img/s':>9}{'step s':>9}{'peak GiB':>10}"
    print(header + f"{'CRF wait':>10}")
    for r in results:
        print(
            f"{r['case']:<15}{r['input_size']:>6}{r['batch_per_worker']:>7}"
            f"{r['images_per_s']:>9.2f}{r['step_s']:>9.3f}{r['peak_memory_gib']:>10.2f}"
            f"{r['crf_wait_share']:>10.1%}"
        )
    print(
        f"paper (WeakCLIP, ViT-B/16, 512, one GPU): {PAPER_IMAGES_PER_S} images/s, "
        f"{PAPER_MEMORY_GIB} GiB"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "results": results,
                    "paper": {"images_per_s": PAPER_IMAGES_PER_S, "memory_gib": PAPER_MEMORY_GIB},
                },
                handle,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
