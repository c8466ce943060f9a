"""An independent control for a dataset: what a small random ViT learns from its seeds.

    python -m benchmarks.feature_control --refine outputs/x/refine --iterations 300 \
        [--targets seeds|gt] [--train-encoder] [--no-photometric] [--json control.json]

Shares nothing with WeakCLIP's model: a 4-layer ViT of width 64 and patch 16 (random weights,
frozen unless `--train-encoder`), its four block outputs concatenated, two transposed
convolutions and a 3 x 3 classifier, plain cross-entropy on the seeds (or, with `--targets gt`,
on the ground truth: a ceiling of what the features allow), batch 8, AdamW. Crops come from the
training stage's own augmentation (`pipelines.train.data.prepare_row`, the `tiny` preset's).
Every train image is then predicted at its own size, restricted to background and its labelled
classes, and scored against the ground truth before and after the post-processing CRF
(`pipelines.pseudo_masks.rows.postprocess`). When this control cannot beat the seeds on a
dataset, no recipe on frozen random features should be expected to (docs/METHOD.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.recipe_ablation import load_rows, score_rows
from pipelines.io import schema
from pipelines.train.data import augment_config_for, prepare_row
from pipelines.training.augment import normalize
from weakclip.config import preset

PATCH, WIDTH, LAYERS, BATCH = 16, 64, 4, 8


class ControlViT(nn.Module):
    """B x 3 x H x W (H, W multiples of 16) → B x K x H x W logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.position = nn.Parameter(torch.randn(1, WIDTH, 32, 32) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, 0.0, batch_first=True, norm_first=True)
            for _ in range(LAYERS)
        )
        self.head = nn.Sequential(
            nn.ConvTranspose2d(LAYERS * WIDTH, 128, 2, 2),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 2, 2),
            nn.ReLU(),
            nn.Conv2d(64, num_classes, 3, padding=1),
        )

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [*self.patch.parameters(), self.position, *self.blocks.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(images)
        b, c, h, w = tokens.shape
        tokens = tokens + F.interpolate(self.position, size=(h, w), mode="bilinear")
        sequence, taps = tokens.flatten(2).transpose(1, 2), []
        for block in self.blocks:
            sequence = block(sequence)
            taps.append(sequence.transpose(1, 2).reshape(b, c, h, w))
        logits = self.head(torch.cat(taps, 1))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear")


def run(rows: list[dict[str, Any]], names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Trains the control on `rows` (the train split) and scores it on the same images."""
    torch.manual_seed(0)
    config, model = preset("tiny"), ControlViT(len(names))
    augment = augment_config_for(config)
    augment = dataclasses.replace(augment, photometric=augment.photometric and args.photometric)
    for p in model.encoder_parameters():
        p.requires_grad_(args.train_encoder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    rng, order, started = np.random.default_rng(0), [], time.perf_counter()
    target = schema.GT if args.targets == "gt" else schema.SEED
    for _ in range(args.iterations):
        batch = []
        for _ in range(BATCH):
            order = order or list(rng.permutation(len(rows)))
            r = rows[order.pop()]
            batch.append(
                prepare_row(
                    **{k: r[k] for k in ("image_id", "labels", "height", "width")},
                    image_bytes=r[schema.IMAGE],
                    seed_bytes=r[target],
                    num_classes=len(names),
                    rng=rng,
                    augment=augment,
                    loss_resolution=64,
                )
            )
        images = torch.from_numpy(np.stack([b["image"] for b in batch]))
        labels = torch.from_numpy(np.stack([b["seed"] for b in batch])).long()
        logits = F.interpolate(model(images), size=labels.shape[-2:], mode="bilinear")
        loss = F.cross_entropy(logits, labels, ignore_index=schema.IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - started

    def probs_of(image: np.ndarray, classes: list[int]) -> np.ndarray:
        h, w = image.shape[:2]
        x = torch.from_numpy(normalize(image, mean=augment.mean, std=augment.std))[None]
        logits = model(F.pad(x, (0, -w % PATCH, 0, -h % PATCH)))[0, classes, :h, :w]
        return torch.softmax(logits, 0).numpy()

    scores = score_rows(rows, len(names), config.inference.crf, probs_of)
    return {
        **{k: round(100 * scores[k], 1) for k in ("seeds", "argmax")},
        "crf": round(100 * scores["pseudo"], 1),
        "zero_iou": [names[c] for c in scores["zero_iou_classes"]],
        "train_seconds": round(train_seconds, 1),
        "settings": {k: v for k, v in vars(args).items() if k not in ("refine", "json")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feature_control")
    parser.add_argument("--refine", required=True, help="a finished refine output directory")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--targets", choices=("seeds", "gt"), default="seeds")
    parser.add_argument("--train-encoder", action="store_true", help="train the ViT too")
    parser.add_argument("--no-photometric", dest="photometric", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the result to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, names = load_rows(args.refine)
    result = run([r for r in rows if r[schema.SPLIT] == "train"], names, args)
    print(f"{'seeds':>6} {'argmax':>6} {'crf':>6} {'s':>6}  zero-IoU")
    print(
        f"{result['seeds']:6.1f} {result['argmax']:6.1f} {result['crf']:6.1f} "
        f"{result['train_seconds']:6.0f}  {result['zero_iou']}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
