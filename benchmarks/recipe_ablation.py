"""One-change-at-a-time ablations of the WeakCLIP training recipe, in one process, no Ray.

    python -m benchmarks.recipe_ablation --refine outputs/x/refine --iterations 100 \
        --variant base --variant 'no-photometric={"train": {"photometric": false}}'

Reads a finished refine output (local directory), trains the `tiny` preset (or `--model`) on its
train split with the training stage's own pieces (`pipelines.train.data.prepare_row`, the
model builder, the three losses, the boundary-loss CRF, the warm-up + cosine schedule), then
predicts every train image with the pseudo-mask stage's inference
(`pipelines.pseudo_masks.infer.predict_probabilities`) and scores it against the ground truth,
before and after the post-processing CRF. Each variant is a JSON override of the model config.

What differs from the Ray stage, on purpose: one process instead of a Ray Train worker group;
the global batch is split into `--workers` forward passes so BatchNorm sees the per-worker
batch it sees under DDP (the gradients are averaged the same way); the data order comes from
this script's own generator. Prints one table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.io import schema
from pipelines.io.codecs import decode_label_map, decode_rgb
from pipelines.io.manifest_format import read_manifest
from pipelines.io.storage import resolve
from pipelines.metrics import ConfusionAccumulator
from pipelines.pseudo_masks.infer import allowed_classes, predict_probabilities
from pipelines.pseudo_masks.rows import postprocess
from pipelines.train.crf_pool import crf_params
from pipelines.train.data import augment_config_for, prepare_row
from pipelines.training.worker import Schedule
from weakclip.build import build_weakclip
from weakclip.config import WeakCLIPConfig, from_dict, preset
from weakclip.crf import boundary_crf_targets
from weakclip.losses import (
    auxiliary_loss,
    boundary_loss,
    downsample_seeds,
    loss_probabilities,
    resize_logits,
    seeding_loss,
)


def load_rows(refine_uri: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every row of a finished refine output (local or remote) and its class names."""
    loc = resolve(refine_uri)
    manifest = read_manifest(loc)
    rows: list[dict[str, Any]] = []
    for entry in manifest.files:
        if not entry.path.endswith(".parquet"):
            continue
        with loc.fs.open(loc.child(entry.path).path, "rb") as handle:
            rows.extend(pq.read_table(handle).to_pylist())
    return rows, list(manifest.class_names)


class _SimpleHead(torch.nn.Module):
    """The frozen image encoder's four taps, concatenated, two transposed convolutions and a
    3x3 classifier: a control that shows what the frozen features allow."""

    def __init__(self, encoder: torch.nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(4 * channels, 128, kernel_size=2, stride=2),
            torch.nn.GELU(),
            torch.nn.ConvTranspose2d(128, 64, kernel_size=2, stride=2),
            torch.nn.GELU(),
            torch.nn.Conv2d(64, num_classes, kernel_size=3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> Any:
        with torch.no_grad():
            taps = self.encoder(images).taps
        logits = self.head(torch.cat(list(taps), dim=1))
        score_map = torch.zeros_like(logits[:, :, ::4, ::4])
        return type("Output", (), {"logits": logits, "score_map": score_map})()


def _train(
    config: WeakCLIPConfig,
    rows: list[dict[str, Any]],
    class_names: list[str],
    *,
    workers: int,
    boundary: float,
    absent_tolerance: float | None,
    plain_ce: bool,
    simple_head: bool,
    targets: str,
    seed: int,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    torch.manual_seed(config.train.seed)
    model = build_weakclip(config, class_names)
    if simple_head:
        model = _SimpleHead(model.image_encoder, config.adapter.channels, len(class_names))
    trainable = [p for p in model.parameters() if p.requires_grad]
    train = config.train
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = Schedule.of(config.train).scheduler(optimizer)
    augment = augment_config_for(config)
    size = config.loss.resolution
    num_classes = len(class_names)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    history: list[dict[str, float]] = []
    model.train()
    for iteration in range(train.iterations):
        optimizer.zero_grad(set_to_none=True)
        terms = np.zeros(3)
        for part in np.array_split(np.arange(train.batch_size), workers):
            batch = []
            for _ in part:
                if not order:
                    order = list(rng.permutation(len(rows)))
                row = rows[order.pop()]
                batch.append(
                    prepare_row(
                        image_id=row[schema.IMAGE_ID],
                        image_bytes=row[schema.IMAGE],
                        seed_bytes=row[schema.SEED if targets == "seeds" else schema.GT],
                        labels=row[schema.LABELS],
                        height=row[schema.HEIGHT],
                        width=row[schema.WIDTH],
                        num_classes=num_classes,
                        rng=rng,
                        augment=augment,
                        loss_resolution=size,
                    )
                )
            images = torch.from_numpy(np.stack([b["image"] for b in batch]))
            seeds = torch.from_numpy(np.stack([b["seed"] for b in batch])).long()
            output = model(images)
            if plain_ce:
                seeding = torch.nn.functional.cross_entropy(
                    resize_logits(output.logits, size=size),
                    downsample_seeds(seeds, size=size),
                    ignore_index=255,
                )
            else:
                seeding = seeding_loss(output.logits, seeds, size=size)
            auxiliary = auxiliary_loss(
                output.score_map,
                seeds,
                tau=config.loss.tau,
                over_all_pixels=config.loss.aux_over_all_pixels,
                size=config.loss.aux_resolution,
            )
            total = seeding + config.loss.aux_weight * auxiliary
            bnd = torch.zeros(())
            if boundary:
                probs = loss_probabilities(output.logits, size=size)
                q = boundary_crf_targets(
                    np.stack([b["crf_image"] for b in batch]),
                    probs.detach().numpy(),
                    np.stack([b["class_mask"] for b in batch]),
                    **crf_params(config.loss.boundary_crf, prob_floor=config.loss.prob_clamp),
                    absent_tolerance=absent_tolerance,
                )
                bnd = boundary_loss(
                    probs,
                    torch.from_numpy(q),
                    prob_floor=config.loss.prob_clamp,
                    ratio_min=config.loss.ratio_min,
                    ratio_max=config.loss.ratio_max,
                )
                total = total + boundary * bnd
            (total / workers).backward()
            terms += [float(t.detach()) for t in (seeding, bnd, auxiliary)]
        optimizer.step()
        scheduler.step()
        if (iteration + 1) % 25 == 0 or iteration + 1 == train.iterations:
            seeding_v, boundary_v, aux_v = terms / workers
            history.append(
                {"iteration": iteration + 1, "seeding": seeding_v, "boundary": boundary_v,
                 "auxiliary": aux_v}
            )  # fmt: skip
    return model, history


def score_rows(
    rows: list[dict[str, Any]],
    num_classes: int,
    crf: Any,
    probs_of: Callable[[np.ndarray, list[int]], np.ndarray],
) -> dict[str, Any]:
    """Seeds, argmax and post-CRF (`crf`) mIoU of `rows` against their ground truth, where
    `probs_of(image, classes)` gives the C x H x W float32 probabilities of an H x W x 3 image
    over its classes (background + labels); `zero_iou_classes`: present ids at IoU 0 after CRF."""
    raw, post = ConfusionAccumulator(num_classes), ConfusionAccumulator(num_classes)
    seeds = ConfusionAccumulator(num_classes)
    with torch.inference_mode():
        for row in rows:
            height, width = row[schema.HEIGHT], row[schema.WIDTH]
            image = decode_rgb(row[schema.IMAGE], height, width)
            gt = decode_label_map(row[schema.GT], "ground truth", (height, width))
            classes = allowed_classes(row[schema.LABELS], num_classes, restrict=True)
            probs = probs_of(image, classes)
            raw.add(postprocess(image, probs, classes, crf=None), gt)
            post.add(postprocess(image, probs, classes, crf=crf), gt)
            seeds.add(decode_label_map(row[schema.SEED], "seed", (height, width)), gt)
    present = sorted({int(c) for row in rows for c in row[schema.LABELS]})
    post_score = post.score()
    zero = [c for c in present if not (post_score.per_class_iou[c] > 0)]
    return {
        "seeds": seeds.score().miou,
        "argmax": raw.score().miou,
        "pseudo": post_score.miou,
        "zero_iou_classes": zero,
    }


def _score(
    model: torch.nn.Module,
    config: WeakCLIPConfig,
    rows: list[dict[str, Any]],
    num_classes: int,
) -> dict[str, Any]:
    model.eval()
    return score_rows(
        rows,
        num_classes,
        config.inference.crf,
        lambda image, classes: predict_probabilities(
            lambda x: model(x).logits,
            image,
            classes,
            num_classes=num_classes,
            inference=config.inference,
            pixel_mean=config.clip.pixel_mean,
            pixel_std=config.clip.pixel_std,
            device=torch.device("cpu"),
        ).astype(np.float32),
    )


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_ablation")
    parser.add_argument("--refine", required=True, help="a finished refine output directory")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="BatchNorm groups per batch")
    parser.add_argument("--base", default="{}", help="JSON override applied to every variant")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME or NAME=JSON override; special keys: _boundary (a boundary weight instead "
        "of loss.boundary_weight; 0 skips the CRF), _workers (BatchNorm groups), "
        "_absent_tolerance (boundary CRF restriction), _loss (seeding | ce), "
        "_simple_head (a control head on the frozen taps), _targets (seeds | gt: train on the "
        "ground truth instead, a ceiling of what the features allow)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, class_names = load_rows(args.refine)
    train_rows = [r for r in rows if r.get(schema.SPLIT) in (None, "train")]
    base = _merge({"train": {"iterations": args.iterations}}, json.loads(args.base))
    results = []
    header = f"{'variant':32s} {'seeds':>6s} {'argmax':>6s} {'pseudo':>6s} {'s':>6s}  zero-IoU"
    print(header)
    for spec in args.variant or ["base"]:
        name, _, text = spec.partition("=")
        override = _merge(base, json.loads(text) if text else {})
        boundary_override = override.pop("_boundary", None)
        workers = int(override.pop("_workers", args.workers))
        absent = override.pop("_absent_tolerance", None)
        plain_ce = override.pop("_loss", "seeding") == "ce"
        simple_head = bool(override.pop("_simple_head", False))
        targets = str(override.pop("_targets", "seeds"))
        if targets not in ("seeds", "gt"):
            raise SystemExit(f"_targets: expected seeds or gt, got {targets!r}")
        config = from_dict(override, base=preset(args.model))
        boundary = float(
            config.loss.boundary_weight if boundary_override is None else boundary_override
        )
        started = time.monotonic()
        model, history = _train(
            config,
            train_rows,
            class_names,
            workers=workers,
            boundary=boundary,
            absent_tolerance=absent,
            plain_ce=plain_ce,
            simple_head=simple_head,
            targets=targets,
            seed=0,
        )
        score = _score(model, config, train_rows, len(class_names))
        seconds = time.monotonic() - started
        row = {"variant": name, **score, "seconds": seconds, "history": history}
        results.append(row)
        print(
            f"{name:32s} {100 * score['seeds']:6.1f} {100 * score['argmax']:6.1f} "
            f"{100 * score['pseudo']:6.1f} {seconds:6.0f}  {score['zero_iou_classes']}  "
            f"loss {history[-1]['seeding']:.2f}/{history[-1]['boundary']:.3f}/"
            f"{history[-1]['auxiliary']:.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
