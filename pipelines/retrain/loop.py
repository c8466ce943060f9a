"""The per-worker step of the retraining job (`masked_cross_entropy` under autocast), run by
`pipelines.training.worker.train_steps`, and the val scoring after the last step.

The workers score the network on val ground truth at the original image size (docs/METHOD.md),
on their device: the val rows (`pipelines.retrain.data.plan_rows`) are dealt by `ids_of_rank`,
each worker reads only the row groups holding its ids, and `score_worker` sums the confusion
matrices; the last checkpoint's `meta.json` carries the result under `evaluation`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.io import schema
from pipelines.io.codecs import decode_label_map, decode_rgb
from pipelines.io.parquet import read_row_group
from pipelines.io.schema import IGNORE_INDEX
from pipelines.io.storage import Location
from pipelines.metrics import ConfusionAccumulator
from pipelines.retrain.model import build_model, load_backbone_weights, logits, predict_labels
from pipelines.training import worker
from pipelines.training.data import IMAGE_COLUMNS


def masked_cross_entropy(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of B x K x H x W logits over the labelled pixels of B x H x W masks
    (255 = ignore); 0 when none is labelled."""
    total = F.cross_entropy(scores.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = (masks != IGNORE_INDEX).sum().clamp(min=1)
    return total / labelled


def retrain_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train loop; `loop_config` is built by `pipelines.retrain.stage.run_retrain`."""
    rank, world, device = context = worker.worker_context(loop_config)
    config = loop_config["config"]
    class_names = list(loop_config["class_names"])
    # The data pipeline starts now, while the model is built.
    restored = worker.restore_checkpoint(loop_config["signature"])
    batches = worker.open_batches(
        loop_config, rank=rank, start=worker.Restored.iteration(restored), seed=config.seed
    )
    torch.manual_seed(config.seed)
    model = build_model(config.architecture, len(class_names))
    if restored is not None:
        model.load_state_dict(restored.state["model"], strict=True)
    elif (path := loop_config["weights"].fetch("backbone weights")) is not None:
        load_backbone_weights(model, path, architecture=config.architecture)
    autocast = worker.autocast_for(device)

    def step(
        ddp: nn.Module, batch: dict[str, torch.Tensor], batches: worker.Batches, accumulation: int
    ) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        with autocast:
            scores = logits(ddp, images)
        loss = masked_cross_entropy(scores, masks)
        (loss / accumulation).backward()
        return {"loss": float(loss.detach())}, batches.next()

    def evaluate() -> dict[str, Any]:
        refs = loop_config["val_rows"]
        started = time.perf_counter()
        rows = read_val_rows(loop_config["source"], refs, ids_of_rank(refs, rank, world))
        result = score_worker(model, rows, num_classes=len(class_names), device=device, world=world)
        return {"evaluation": {**result, "seconds": time.perf_counter() - started}}

    worker.train_steps(
        loop_config,
        context=context,
        model=model,
        restored=restored,
        train=config,
        meta={
            "config": asdict(config),
            "class_names": class_names,
            "signature": loop_config["signature"],
        },
        step=step,
        final_meta=evaluate,
        stage="retrain",
        batches=batches,
    )


def ids_of_rank(val_ids: Iterable[str], rank: int, world: int) -> list[str]:
    """The val ids worker `rank` of `world` scores (every id goes to exactly one worker)."""
    return sorted(val_ids)[rank::world]


def read_val_rows(
    source: Location, refs: Mapping[str, tuple[str, int]], ids: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """The source rows of `ids`, reading only the row groups `refs` (id → (shard, group)) names."""
    wanted = set(ids)
    for path, group in sorted({refs[image_id] for image_id in wanted}):
        for row in read_row_group(source, path, group, (*IMAGE_COLUMNS, schema.GT)).to_pylist():
            if row[schema.IMAGE_ID] in wanted:
                yield row


def score_worker(
    model: nn.Module,
    rows: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    device: torch.device,
    world: int,
) -> dict[str, Any]:
    """This worker's rows scored against their GT (undecodable ones skipped) and summed over the
    workers (a collective: call on every rank): `confusion` (K x (K + 1) lists), `images`,
    `skipped`."""
    scores = ConfusionAccumulator(num_classes)
    was_training = model.training
    model.eval()
    images = skipped = 0
    for row in rows:
        height, width = int(row[schema.HEIGHT]), int(row[schema.WIDTH])
        try:
            rgb = decode_rgb(row[schema.IMAGE], height, width)
            gt = decode_label_map(row[schema.GT], "ground truth", (height, width))
            scores.add(predict_labels(model, rgb, device=device), gt)
            images += 1
        except (OSError, ValueError, TypeError, SyntaxError, EOFError):
            skipped += 1
    model.train(was_training)
    totals = torch.from_numpy(np.append(scores.matrix.ravel(), [images, skipped]))
    values = worker.all_reduce_sum(totals, device, world).numpy()
    return {
        "confusion": values[:-2].reshape(scores.matrix.shape).tolist(),
        "images": int(values[-2]),
        "skipped": int(values[-1]),
    }
