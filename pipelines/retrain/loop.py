"""The per-worker step of the retraining job, run by `pipelines.training.worker.train_steps`.

Pixel-wise cross-entropy against the pseudo masks (255 ignored; the mean over labelled pixels,
0 for a batch without any) under autocast. After the last step the workers score the network
on the val rows (`pipelines.retrain.evaluation`) and the last checkpoint's `meta.json` carries
the result under `evaluation`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.io.schema import IGNORE_INDEX
from pipelines.retrain.evaluation import ids_of_rank, read_val_rows, score_worker
from pipelines.retrain.model import build_model, load_backbone_weights, logits
from pipelines.training import worker


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
    torch.manual_seed(config.seed)
    model = build_model(config.architecture, len(class_names))
    restored = worker.restore_checkpoint(loop_config["signature"])
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
        keys=("loss",),
        final_meta=evaluate,
    )
