"""The per-worker WeakCLIP step that Ray Train runs in `pipelines.training.worker.train_steps`.

One micro-step: forward under autocast, P = softmax of the logits at the loss resolution; P goes
to the CRF pool (`pipelines.train.crf_pool`) while the seeding and auxiliary losses, their
gradients with respect to the outputs and the next batch are computed; then Q's boundary loss
joins them and one backward pass runs through the model. DDP covers the trainable parameters
only; `co_attention.chain_layers=False` leaves every co-attention layer but the last without a
gradient, so those are frozen here and DDP needs no `find_unused_parameters`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pipelines.train import export
from pipelines.train.crf_pool import CRFPool, crf_params
from pipelines.training import checkpoint as ckpt
from pipelines.training import worker
from weakclip.build import build_weakclip
from weakclip.config import WeakCLIPConfig, from_dict
from weakclip.losses import auxiliary_loss, boundary_loss, loss_probabilities, seeding_loss


def freeze_dead_layers(model: nn.Module, config: WeakCLIPConfig) -> list[str]:
    """Freezes the co-attention layers whose output is discarded (`chain_layers=False`); returns
    the names of the parameters frozen here."""
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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train loop; `loop_config` is built by `pipelines.train.stage.run_train`."""
    rank, world, device = context = worker.worker_context(loop_config)
    config = from_dict(loop_config["model_config"], WeakCLIPConfig)
    class_names = list(loop_config["class_names"])
    processes = loop_config["crf_processes"]
    if processes is None:  # auto: parallel CRFs on GPU workers, one process on CPU workers
        processes = min(int(loop_config["micro_batch_size"]), 4) if device.type == "cuda" else 1
    # Fork the CRF processes before the model exists: the children stay small.
    with CRFPool(
        processes=int(processes),
        params=crf_params(config.loss.boundary_crf, prob_floor=config.loss.prob_clamp),
        absent_tolerance=loop_config.get("absent_tolerance"),
    ) as pool:
        # The data pipeline starts now (threads: after the fork), while the model is built.
        restored = worker.restore_checkpoint(loop_config["signature"])
        start, seed = worker.Restored.iteration(restored), config.train.seed
        batches = worker.open_batches(loop_config, rank=rank, start=start, seed=seed)
        clip = loop_config["clip"]
        clip_path = clip.fetch("CLIP weights")
        # Same seed on every rank: a random-init CLIP is then the same everywhere.
        torch.manual_seed(config.train.seed)
        model = build_weakclip(config, class_names, clip_weights=clip_path)
        frozen = ckpt.frozen_parameter_names(model)
        freeze_dead_layers(model, config)
        if restored is not None:
            export.load_model_weights(
                model, trainable=restored.state["model"], clip=restored.clip, frozen=frozen
            )
        clip_sha256 = clip.sha256 or ckpt.state_digest(ckpt.state_part(model, frozen, clip=True))
        autocast, size = worker.autocast_for(device), config.loss.resolution
        worker.train_steps(
            loop_config,
            context=context,
            model=model,
            restored=restored,
            train=config.train,
            meta={
                "config": loop_config["model_config"],
                "class_names": class_names,
                "clip_weights": {**clip.source, "sha256": clip_sha256},
                "signature": loop_config["signature"],
            },
            step=lambda ddp, batch, batches, accumulation: _micro_step(
                ddp, batch, batches, pool, config, device, autocast, size, accumulation
            ),
            waits={"crf_wait_s": lambda: pool.wait_seconds},
            frozen=frozen,
            include_frozen=clip_path is None,
            finish_row=lambda row: row.update(
                crf_wait_share=row["crf_wait_s"] / max(row["step_s"], 1e-9)
            ),
            batches=batches,
        )


def _micro_step(
    ddp: nn.Module,
    batch: dict[str, torch.Tensor],
    batches: worker.Batches,
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
    logits, score_map, loss = output.logits, output.score_map, config.loss
    probs = loss_probabilities(logits, size=size)  # B x K x s x s, float32
    weight = loss.boundary_weight
    pending = None
    if weight > 0:  # a zero weight (an ablation) skips the CRF altogether
        pending = pool.submit(
            batch["crf_image"].numpy(), probs.detach().cpu().numpy(), batch["class_mask"].numpy()
        )
    # While the pool works: the losses that do not need Q, their gradients with respect to the
    # outputs (a few small kernels), and the next batch.
    seeding = seeding_loss(logits, seeds, size=size, log_epsilon=loss.seeding_log_epsilon)
    auxiliary = auxiliary_loss(
        score_map,
        seeds,
        tau=loss.tau,
        over_all_pixels=loss.aux_over_all_pixels,
        size=loss.aux_resolution,
    )
    partial = (seeding + loss.aux_weight * auxiliary) / accumulation
    grad_logits, grad_score = torch.autograd.grad(partial, [logits, score_map], retain_graph=True)
    next_batch = batches.next()
    boundary_value = 0.0
    if pending is not None:
        q = torch.from_numpy(pool.result(pending)).to(device)
        boundary = boundary_loss(
            probs,
            q,
            prob_floor=loss.prob_clamp,
            ratio_min=loss.ratio_min,
            ratio_max=loss.ratio_max,
            clamp_probs=loss.clamp_boundary_probs,
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
        "loss": seeding_value + weight * boundary_value + loss.aux_weight * auxiliary_value,
        "loss_seeding": seeding_value,
        "loss_boundary": boundary_value,
        "loss_auxiliary": auxiliary_value,
    }
    return terms, next_batch
