"""The per-worker loop of the retraining job (Ray Train's `train_loop_per_worker`).

Each step: per micro-batch (gradient accumulation when the worker's share of the global batch
is larger), forward under autocast (bf16 on CUDA), pixel-wise cross-entropy against the pseudo
masks (255 ignored; the mean over labelled pixels, 0 for a batch without any), backward; then
AdamW and the warm-up + cosine schedule step (`pipelines.training.worker.warmup_cosine_scheduler`).
DDP averages the gradients over the workers. Checkpoints (`pipelines.training.checkpoint`: the whole
state dict, optimizer, scheduler, iteration, logged rows, and the run signature a resume is checked
against) are reported on every worker at the same iterations, the checkpoint from rank 0. After the
last step the workers score the network on the val rows (`pipelines.retrain.evaluation`) and the
last checkpoint's `meta.json` carries the result under `evaluation`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.io.schema import IGNORE_INDEX
from pipelines.retrain.evaluation import ids_of_rank, read_val_rows, score_worker
from pipelines.retrain.model import build_model, load_backbone_weights, logits
from pipelines.training.worker import (
    LogWindow,
    autocast_for,
    fetch_weights,
    maybe_fail,
    report_checkpoint,
    restore_checkpoint,
    train_batches,
    warmup_cosine_scheduler,
    worker_context,
    wrap_ddp,
)


def masked_cross_entropy(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels (0 when none is labelled).

    Args:
        scores: B x K x H x W logits.
        masks: B x H x W class ids, 255 = ignore.
    """
    total = F.cross_entropy(scores.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = (masks != IGNORE_INDEX).sum().clamp(min=1)
    return total / labelled


def retrain_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train loop; `loop_config` is built by `pipelines.retrain.stage.run_retrain`."""
    rank, world, device = worker_context(loop_config)
    config = loop_config["config"]
    class_names = list(loop_config["class_names"])
    torch.manual_seed(config.seed)
    model = build_model(config.architecture, len(class_names))
    start_iteration = 0
    history: list[dict[str, Any]] = []
    restored = restore_checkpoint(loop_config["signature"])
    if restored is not None:
        model.load_state_dict(restored.state["model"], strict=True)
        start_iteration, history = restored.iteration, restored.history
    elif loop_config.get("backbone_weights") is not None:
        path = fetch_weights(
            loop_config["backbone_weights"],
            loop_config["backbone_sha256"],
            what="backbone weights",
        )
        assert path is not None
        load_backbone_weights(model, path, architecture=config.architecture)
    model.to(device)
    meta = {
        "config": loop_config["stage_config"],
        "class_names": class_names,
        "signature": loop_config["signature"],
    }
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = warmup_cosine_scheduler(
        optimizer,
        lr=config.lr,
        min_lr=config.min_lr,
        warmup=config.effective_warmup_iterations,
        total=config.iterations,
    )
    if restored is not None:
        optimizer.load_state_dict(restored.state["optimizer"])
        scheduler.load_state_dict(restored.state["scheduler"])
    ddp = wrap_ddp(model, device, world)
    micro = int(loop_config["micro_batch_size"])
    accumulation = int(loop_config["accumulation_steps"])
    batches = train_batches(micro, seed=config.seed, start_iteration=start_iteration, rank=rank)
    autocast = autocast_for(device)
    checkpoint_every = int(loop_config["checkpoint_every"])
    log_every = int(loop_config["log_every"])

    def evaluate() -> dict[str, Any]:
        refs = loop_config["val_rows"]
        started = time.perf_counter()
        rows = read_val_rows(loop_config["source"], refs, ids_of_rank(refs, rank, world))
        result = score_worker(model, rows, num_classes=len(class_names), device=device, world=world)
        result["seconds"] = time.perf_counter() - started
        return result

    def report(iteration: int) -> None:
        final = iteration == config.iterations
        report_checkpoint(
            model,
            frozen=(),
            optimizer=optimizer,
            scheduler=scheduler,
            iteration=iteration,
            meta={**meta, "evaluation": evaluate()} if final else meta,
            history=history,
            rank=rank,
            include_frozen=False,
        )

    model.train()
    window = LogWindow(("loss",), waits={"data_wait_s": lambda: batches.wait_seconds})
    iteration = start_iteration
    if iteration >= config.iterations:  # finished before an interrupted export: report again
        report(iteration)
    while iteration < config.iterations:
        maybe_fail(loop_config, iteration, rank, world)
        optimizer.zero_grad(set_to_none=True)
        for micro_step in range(accumulation):
            batch = batches.next()
            if batch is None:
                raise RuntimeError(f"training data ran out at iteration {iteration}")
            sync = contextlib.nullcontext() if micro_step == accumulation - 1 else ddp.no_sync()
            with sync:
                images = batch["image"].to(device, non_blocking=True)
                masks = batch["mask"].to(device, non_blocking=True).long()
                with autocast:
                    scores = logits(ddp, images)
                loss = masked_cross_entropy(scores, masks) / accumulation
                loss.backward()
            window.add({"loss": float(loss.detach())})
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        iteration += 1
        window.step()
        if iteration % log_every == 0 or iteration == config.iterations:
            history.append(
                window.row(
                    iteration=iteration,
                    lr=step_lr,
                    global_batch=micro * accumulation * world,
                    device=device,
                    world=world,
                )
            )
        if iteration % checkpoint_every == 0 or iteration == config.iterations:
            report(iteration)


__all__ = ["masked_cross_entropy", "retrain_loop_per_worker"]
