"""The per-worker WeakCLIP training loop that Ray Train runs (`TorchTrainer`'s loop function).

One step on a worker, per micro-batch (gradient accumulation when the worker's share of the
global batch is larger than its micro-batch):
1. forward under autocast (bf16 on CUDA), P = softmax of the logits at the loss resolution;
2. P goes to the CRF pool (`pipelines.train.crf_pool`), which computes Q in parallel processes;
3. while it works: the seeding and auxiliary losses and their gradients with respect to the
   model outputs, and the next batch from Ray Data;
4. Q back (the wait is measured), the boundary loss's gradient, times
   `loss.boundary_weight`, joins the others and one backward pass runs through the model (DDP
   reduces the trainable gradients there).
Then AdamW and the warm-up + cosine schedule step.

DDP covers the trainable parameters only: the frozen CLIP parameters are excluded from its
broadcast and reduction. `co_attention.chain_layers=False` (the released code's unchained
loop) leaves every co-attention layer but the last without a gradient; those layers are frozen
here (they cannot influence the output), so DDP needs no `find_unused_parameters`.

`ray.train.report` runs on every worker at the same iterations (every `checkpoint_every` and
the last), with the checkpoint from rank 0.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pipelines.io.storage import Location
from pipelines.train import export
from pipelines.train.crf_pool import CRFPool, crf_params
from pipelines.training import checkpoint as ckpt
from pipelines.training.worker import (
    Batches,
    InjectedFailure,
    LogWindow,
    autocast_for,
    fetch_weights,
    lr_at,
    maybe_fail,
    report_checkpoint,
    restore_checkpoint,
    train_batches,
    warmup_cosine_scheduler,
    worker_context,
    wrap_ddp,
)
from weakclip.build import build_weakclip
from weakclip.config import WeakCLIPConfig, from_dict
from weakclip.losses import auxiliary_loss, boundary_loss, loss_probabilities, seeding_loss


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: WeakCLIPConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The paper's schedule, warm-up capped at `max_warmup_fraction` of the run (docs/METHOD.md)."""
    train = config.train
    return warmup_cosine_scheduler(
        optimizer,
        lr=train.lr,
        min_lr=train.min_lr,
        warmup=train.effective_warmup_iterations,
        total=train.iterations,
    )


def freeze_dead_layers(model: nn.Module, config: WeakCLIPConfig) -> list[str]:
    """Freezes co-attention layers whose output is discarded (`chain_layers=False`).

    Returns:
        Names of the parameters frozen here.
    """
    if config.co_attention.chain_layers:
        return []
    frozen = []
    for stack_name, stack in model.co_attention.named_children():
        if isinstance(stack, nn.ModuleList) and len(stack) > 1:
            for index, layer in enumerate(stack[:-1]):
                for name, param in layer.named_parameters():
                    param.requires_grad_(False)
                    frozen.append(f"co_attention.{stack_name}.{index}.{name}")
    return frozen


def fetch_clip_weights(location: Location | None, sha256: str | None) -> str | None:
    """A local copy of the CLIP weights file, checked against the digest the driver recorded."""
    return fetch_weights(location, sha256, what="CLIP weights")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train loop; `loop_config` is built by `pipelines.train.stage.run_train`."""
    rank, world, device = worker_context(loop_config)
    config = from_dict(loop_config["model_config"], WeakCLIPConfig)
    class_names = list(loop_config["class_names"])
    # Fork the CRF processes before the model exists: the children stay small.
    pool = CRFPool(
        processes=int(loop_config["crf_processes"]),
        params=crf_params(config.loss.boundary_crf, prob_floor=config.loss.prob_clamp),
        absent_tolerance=loop_config.get("absent_tolerance"),
    )
    try:
        _train(loop_config, config, class_names, device, rank, world, pool)
    finally:
        pool.close()


def _train(
    loop_config: dict[str, Any],
    config: WeakCLIPConfig,
    class_names: list[str],
    device: torch.device,
    rank: int,
    world: int,
    pool: CRFPool,
) -> None:
    train = config.train
    clip_path = fetch_clip_weights(loop_config.get("clip_weights"), loop_config.get("clip_sha256"))
    # Same seed on every rank: a random-init CLIP is then the same everywhere.
    torch.manual_seed(train.seed)
    model = build_weakclip(config, class_names, clip_weights=clip_path)
    frozen = ckpt.frozen_parameter_names(model)
    freeze_dead_layers(model, config)
    include_clip = clip_path is None

    start_iteration = 0
    history: list[dict[str, Any]] = []
    restored = restore_checkpoint(loop_config["signature"])
    if restored is not None:
        export.load_model_weights(
            model, trainable=restored.state["model"], clip=restored.clip, frozen=frozen
        )
        start_iteration, history = restored.iteration, restored.history
        if rank == 0:
            print(f"resumed from iteration {start_iteration}", flush=True)
    model.to(device)
    clip_sha256 = loop_config.get("clip_sha256") or ckpt.state_digest(
        ckpt.frozen_state_dict(model, frozen)
    )
    meta = {
        "config": loop_config["model_config"],
        "class_names": class_names,
        "clip_weights": {"source": loop_config.get("clip_uri"), "sha256": clip_sha256},
        "signature": loop_config["signature"],
    }

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = make_scheduler(optimizer, config)
    if restored is not None:
        optimizer.load_state_dict(restored.state["optimizer"])
        scheduler.load_state_dict(restored.state["scheduler"])
    ddp = wrap_ddp(model, device, world)

    micro = int(loop_config["micro_batch_size"])
    accumulation = int(loop_config["accumulation_steps"])
    batches = train_batches(micro, seed=train.seed, start_iteration=start_iteration, rank=rank)
    autocast = autocast_for(device)
    size = config.loss.resolution
    checkpoint_every = int(loop_config["checkpoint_every"])
    log_every = int(loop_config["log_every"])
    global_batch = micro * accumulation * world

    window = LogWindow(
        ("loss", "loss_seeding", "loss_boundary", "loss_auxiliary"),
        waits={
            "crf_wait_s": lambda: pool.wait_seconds,
            "data_wait_s": lambda: batches.wait_seconds,
        },
    )
    next_batch = batches.next()
    iteration = start_iteration
    while iteration < train.iterations:
        maybe_fail(loop_config, iteration, rank, world)
        optimizer.zero_grad(set_to_none=True)
        for micro_step in range(accumulation):
            batch = next_batch
            if batch is None:
                raise RuntimeError(f"training data ran out at iteration {iteration}")
            last_micro = micro_step == accumulation - 1
            sync = contextlib.nullcontext() if last_micro else ddp.no_sync()
            with sync:
                terms, next_batch = _micro_step(
                    ddp, batch, batches, pool, config, device, autocast, size, accumulation
                )
            window.add(terms, scale=1 / accumulation)
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        iteration += 1
        window.step()

        is_last = iteration == train.iterations
        if iteration % log_every == 0 or is_last:
            row = window.row(
                iteration=iteration,
                lr=step_lr,
                global_batch=global_batch,
                device=device,
                world=world,
            )
            row["crf_wait_share"] = row["crf_wait_s"] / max(row["step_s"], 1e-9)
            history.append(row)
        if iteration % checkpoint_every == 0 or is_last:
            report_checkpoint(
                model,
                frozen=frozen,
                optimizer=optimizer,
                scheduler=scheduler,
                iteration=iteration,
                meta=meta,
                history=history,
                rank=rank,
                include_frozen=include_clip,
            )


def _micro_step(
    ddp: nn.Module,
    batch: dict[str, torch.Tensor],
    batches: Batches,
    pool: CRFPool,
    config: WeakCLIPConfig,
    device: torch.device,
    autocast: contextlib.AbstractContextManager[Any],
    size: int,
    accumulation: int,
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """Forward, CRF in the pool overlapped with the other losses and the next fetch, backward."""
    images = batch["image"].to(device, non_blocking=True)
    seeds = batch["seed"].to(device, non_blocking=True).long()
    with autocast:
        output = ddp(images)
    logits, score_map = output.logits, output.score_map
    probs = loss_probabilities(logits, size=size)  # B x K x s x s, float32
    weight = config.loss.boundary_weight
    pending = None
    if weight > 0:  # a zero weight (an ablation) skips the CRF altogether
        pending = pool.submit(
            batch["crf_image"].numpy(),
            probs.detach().cpu().numpy(),
            batch["class_mask"].numpy(),
        )
    # While the pool works: the losses that do not need Q, their gradients with respect to the
    # outputs (a few small kernels), and the next batch.
    seeding = seeding_loss(logits, seeds, size=size)
    auxiliary = auxiliary_loss(score_map, seeds, tau=config.loss.tau)
    partial = (seeding + config.loss.aux_weight * auxiliary) / accumulation
    grad_logits, grad_score = torch.autograd.grad(partial, [logits, score_map], retain_graph=True)
    next_batch = batches.next()
    boundary_value = 0.0
    if pending is not None:
        q = torch.from_numpy(pool.result(pending)).to(device)
        boundary = boundary_loss(
            probs,
            q,
            prob_floor=config.loss.prob_clamp,
            ratio_min=config.loss.ratio_min,
            ratio_max=config.loss.ratio_max,
        )
        (grad_boundary,) = torch.autograd.grad(
            weight * boundary / accumulation, [logits], retain_graph=True
        )
        grad_logits = grad_logits + grad_boundary
        boundary_value = float(boundary.detach())
    # One backward pass through the model for all three losses.
    torch.autograd.backward([logits, score_map], [grad_logits, grad_score])
    seeding_value = float(seeding.detach())
    auxiliary_value = float(auxiliary.detach())
    terms = {
        "loss": seeding_value + weight * boundary_value + config.loss.aux_weight * auxiliary_value,
        "loss_seeding": seeding_value,
        "loss_boundary": boundary_value,
        "loss_auxiliary": auxiliary_value,
    }
    return terms, next_batch


__all__ = ["InjectedFailure", "lr_at", "train_loop_per_worker"]
