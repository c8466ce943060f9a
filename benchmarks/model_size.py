"""Parameter count of a WeakCLIP preset, total and trainable, per module.

Builds offline with random CLIP weights. The paper's table: 171.5M total, 21.2M trainable for
VOC (K = 21).

    python -m benchmarks.model_size --model vit-b-16 --num-classes 21 [--json]

With `--json` the last line of the output is one JSON object with `total_params`,
`trainable_params` and `breakdown` (per top-level module).
"""

from __future__ import annotations

import argparse
import json
import logging

from weakclip.build import build_weakclip
from weakclip.config import PRESETS, preset

PAPER_TOTAL = 171.5e6
PAPER_TRAINABLE = 21.2e6
VOC_NAMES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()


def class_names(num_classes: int) -> list[str]:
    """VOC names for K <= 21, else background plus generic one-token-per-word names."""
    if num_classes <= len(VOC_NAMES):
        return VOC_NAMES[:num_classes]
    return ["background"] + [f"class {k}" for k in range(1, num_classes)]


def count(model_name: str, num_classes: int) -> dict[str, object]:
    """Total and trainable parameter counts, overall and per top-level module."""
    model = build_weakclip(preset(model_name), class_names(num_classes))
    breakdown = {}
    for name, module in model.named_children():
        params = list(module.parameters())
        breakdown[name] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    return {
        "model": model_name,
        "num_classes": num_classes,
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "breakdown": breakdown,
    }


def format_table(result: dict) -> str:
    """A plain-text table of `count`'s result beside the paper's numbers."""
    lines = [f"{'module':<16}{'total':>14}{'trainable':>14}"]
    for name, numbers in result["breakdown"].items():
        lines.append(
            f"{name:<16}{numbers['total'] / 1e6:>13.3f}M{numbers['trainable'] / 1e6:>13.3f}M"
        )
    lines.append(
        f"{'all':<16}{result['total_params'] / 1e6:>13.3f}M"
        f"{result['trainable_params'] / 1e6:>13.3f}M"
    )
    if result["model"] == "vit-b-16" and result["num_classes"] == 21:
        lines.append(
            f"{'paper (VOC)':<16}{PAPER_TOTAL / 1e6:>13.1f}M{PAPER_TRAINABLE / 1e6:>13.1f}M"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=PRESETS, default="vit-b-16")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if args.num_classes < 2:
        parser.error("--num-classes must be at least 2")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that weights are random
    result = count(args.model, args.num_classes)
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
