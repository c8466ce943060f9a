"""Training-step throughput and peak memory of WeakCLIP, beside the paper's 16.8 images/s, 9.7 GiB.

One step = forward, a stand-in loss (cross-entropy on the logits at the loss resolution plus
0.4 x cross-entropy on score map / tau at the input size, against random labels), backward and
an AdamW step over the trainable parameters. The boundary loss's online CRF is CPU work that
training overlaps with the model in a process pool; it is not part of this number.

Cases: tiny on CPU, vit-b-16 at 512 on CPU (batch 2), and vit-b-16 with bf16 autocast on CUDA
when a GPU is present. Each case runs in its own process so that peak memory is its own:
CPU: peak resident set size of that process (model, activations, optimizer state, imports);
CUDA: `torch.cuda.max_memory_allocated`.

    python -m benchmarks.model_step [--model tiny|vit-b-16|all] [--batch-size N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

PAPER_IMAGES_PER_S = 16.8
PAPER_MEMORY_GIB = 9.7
DEFAULT_BATCH = {("tiny", "cpu"): 4, ("vit-b-16", "cpu"): 2, ("vit-b-16", "cuda"): 8}
VOC_NAMES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()


def run_case(model_name: str, device: str, batch_size: int, iterations: int, warmup: int) -> dict:
    """Times `iterations` training steps after `warmup` untimed ones, in this process."""
    import torch
    import torch.nn.functional as F

    from weakclip.build import build_weakclip
    from weakclip.config import preset

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that weights are random
    torch.manual_seed(0)
    config = preset(model_name)
    model = build_weakclip(config, VOC_NAMES).to(device).train()
    optimizer = torch.optim.AdamW(
        model.trainable_parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    size = config.clip.input_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, len(VOC_NAMES), (batch_size, size, size), device=device)
    small_labels = labels[:, :: size // config.loss.resolution, :: size // config.loss.resolution]
    use_cuda = device == "cuda"
    precision = "bf16" if use_cuda else "fp32"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_cuda):
            out = model(images)
            logits = F.interpolate(
                out.logits, size=small_labels.shape[-2:], mode="bilinear", align_corners=False
            )
            scores = F.interpolate(
                out.score_map / config.loss.tau, size=(size, size), mode="bilinear"
            )
            loss = F.cross_entropy(logits.float(), small_labels) + config.loss.aux_weight * (
                F.cross_entropy(scores.float(), labels)
            )
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if use_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if use_cuda:
        peak_bytes = torch.cuda.max_memory_allocated()
        device_name = torch.cuda.get_device_name()
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    return {
        "model": model_name,
        "device": device,
        "device_name": device_name,
        "precision": precision,
        "batch_size": batch_size,
        "input_size": size,
        "iterations": iterations,
        "seconds_per_step": seconds / iterations,
        "images_per_s": batch_size * iterations / seconds,
        "peak_memory_gib": peak_bytes / 2**30,
        "peak_memory_kind": "cuda max_memory_allocated" if use_cuda else "process peak RSS",
    }


def format_table(results: list[dict]) -> str:
    """Results beside the paper's training cost (GPU, fp32 released code)."""
    header = (
        f"{'model':<10}{'device':<8}{'prec':<6}{'batch':>6}{'input':>7}{'s/step':>9}"
        f"{'img/s':>9}{'peak GiB':>10}   paper: img/s, GiB"
    )
    lines = [header]
    for r in results:
        paper = (
            f"{PAPER_IMAGES_PER_S:.1f}, {PAPER_MEMORY_GIB:.1f}" if r["model"] == "vit-b-16" else "-"
        )
        lines.append(
            f"{r['model']:<10}{r['device']:<8}{r['precision']:<6}{r['batch_size']:>6}"
            f"{r['input_size']:>7}{r['seconds_per_step']:>9.3f}{r['images_per_s']:>9.2f}"
            f"{r['peak_memory_gib']:>10.2f}   {paper}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "vit-b-16", "all"), default="all")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, help="override every case's batch size")
    parser.add_argument("--iterations", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # MODEL,DEVICE,BATCH: one case, here
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")

    if args.case:
        model_name, device, batch = args.case.split(",")
        result = run_case(model_name, device, int(batch), args.iterations, args.warmup)
        print(json.dumps(result))
        return 0

    import torch

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        print("no CUDA device", file=sys.stderr)
        return 1
    models = ("tiny", "vit-b-16") if args.model == "all" else (args.model,)
    cases = []
    for model_name in models:
        if args.device in ("auto", "cpu"):
            cases.append((model_name, "cpu"))
        if args.device == "cuda" or (args.device == "auto" and has_cuda):
            cases.append((model_name, "cuda"))
    results = []
    for model_name, device in cases:
        batch = args.batch_size or DEFAULT_BATCH.get((model_name, device), 8)
        command = [
            sys.executable,
            "-m",
            "benchmarks.model_step",
            f"--case={model_name},{device},{batch}",
            f"--iterations={args.iterations}",
            f"--warmup={args.warmup}",
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(f"{model_name} on {device} failed:\n{completed.stderr}", file=sys.stderr)
            return 1
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
