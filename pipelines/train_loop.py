"""The per-worker WeakCLIP training loop that Ray Train runs (`TorchTrainer`'s loop function).

One step on a worker, per micro-batch (gradient accumulation when the worker's share of the
global batch is larger than its micro-batch):
1. forward under autocast (bf16 on CUDA), P = softmax of the logits at the loss resolution;
2. P goes to the CRF pool (`pipelines.crf_pool`), which computes Q in parallel processes;
3. while it works: the seeding and auxiliary losses and their gradients with respect to the
   model outputs, and the next batch from Ray Data;
4. Q back (the wait is measured), the boundary loss's gradient joins the others and one
   backward pass runs through the model (DDP reduces the trainable gradients there).
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
import functools
import hashlib
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipelines import checkpoint as ckpt
from pipelines.crf_pool import CRFPool, crf_params
from pipelines.storage import Location
from weakclip.build import build_weakclip
from weakclip.config import WeakCLIPConfig, from_dict
from weakclip.losses import auxiliary_loss, boundary_loss, loss_probabilities, seeding_loss


class InjectedFailure(RuntimeError):
    """The test-only failure switch fired (WEAKCLIP_TEST_FAIL_AT_ITERATION)."""


def lr_at(iteration: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of 0-based step `iteration`: linear warm-up, then cosine to min_lr."""
    if warmup > 0 and iteration < warmup:
        return lr * (iteration + 1) / warmup
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _lr_factor(iteration: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    return lr_at(iteration, lr=lr, min_lr=min_lr, warmup=warmup, total=total) / lr


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: WeakCLIPConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The SPEC §6 schedule (warm-up capped at `max_warmup_fraction` of the run)."""
    train = config.train
    factor = functools.partial(
        _lr_factor,
        lr=train.lr,
        min_lr=train.min_lr,
        warmup=train.effective_warmup_iterations,
        total=train.iterations,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    if location is None:
        return None
    if location.is_local:
        path = location.path
    else:
        suffix = os.path.splitext(location.path)[1]
        cache = os.path.join(tempfile.gettempdir(), "weakclip-clip-cache")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"{sha256}{suffix}")
        if not os.path.exists(path):
            partial = f"{path}.{os.getpid()}.part"
            location.fs.get_file(location.path, partial)
            os.replace(partial, path)
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"CLIP weights {location.uri} changed since the run started")
    return path


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the whole worker process, model and data included.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _maybe_fail(loop_config: dict[str, Any], iteration: int, rank: int, world: int) -> None:
    fail_at = loop_config.get("fail_at_iteration")
    marker = loop_config.get("fail_marker")
    if fail_at is None or marker is None or iteration != fail_at or rank != world - 1:
        return
    try:
        # O_EXCL: only the first attempt that reaches the iteration fails.
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise InjectedFailure(f"injected failure at iteration {iteration} on rank {rank}")


class _Batches:
    """The worker's stream of micro-batches, with the time spent waiting for them."""

    def __init__(self, iterator: Iterator[dict[str, torch.Tensor]]) -> None:
        self._iterator = iterator
        self.wait_seconds = 0.0

    def next(self) -> dict[str, torch.Tensor] | None:
        start = time.perf_counter()
        try:
            return next(self._iterator)
        except StopIteration:
            return None
        finally:
            self.wait_seconds += time.perf_counter() - start


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train loop; `loop_config` is built by `pipelines.train.loop_config`."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = from_dict(loop_config["model_config"], WeakCLIPConfig)
    class_names = list(loop_config["class_names"])
    device = ray.train.torch.get_device()
    if device.type == "cpu" and loop_config.get("torch_threads"):
        torch.set_num_threads(int(loop_config["torch_threads"]))
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
    import ray.train

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
    optimizer_state = scheduler_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            meta = ckpt.read_meta(directory)
            if meta.get("signature") != loop_config["signature"]:
                raise ValueError("the checkpoint belongs to a different run configuration")
            state = ckpt.read_train_state(directory)
            ckpt.load_model_weights(
                model,
                trainable=state["model"],
                clip=ckpt.read_clip_state(directory),
                frozen=frozen,
            )
            optimizer_state, scheduler_state = state["optimizer"], state["scheduler"]
            start_iteration = int(state["iteration"])
            history = ckpt.read_metrics(directory)
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
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    ddp = _wrap_ddp(model, device, world)

    micro = int(loop_config["micro_batch_size"])
    accumulation = int(loop_config["accumulation_steps"])
    shard = ray.train.get_dataset_shard("train")
    batches = _Batches(
        iter(
            shard.iter_torch_batches(
                batch_size=micro,
                drop_last=True,
                device="cpu",
                prefetch_batches=2,
                local_shuffle_buffer_size=max(micro * 4, 16),
                local_shuffle_seed=train.seed + start_iteration + rank,
            )
        )
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    size = config.loss.resolution
    checkpoint_every = int(loop_config["checkpoint_every"])
    log_every = int(loop_config["log_every"])
    global_batch = micro * accumulation * world

    window = {"loss": 0.0, "loss_seeding": 0.0, "loss_boundary": 0.0, "loss_auxiliary": 0.0}
    window_steps = 0
    window_start = time.perf_counter()
    crf_wait0, data_wait0 = pool.wait_seconds, batches.wait_seconds
    next_batch = batches.next()
    iteration = start_iteration
    while iteration < train.iterations:
        _maybe_fail(loop_config, iteration, rank, world)
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
            for key, value in terms.items():
                window[key] += value / accumulation
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        iteration += 1
        window_steps += 1

        is_last = iteration == train.iterations
        if iteration % log_every == 0 or is_last:
            row = _log_row(window, window_steps, window_start, device, world)
            elapsed = time.perf_counter() - window_start
            row.update(
                iteration=iteration,
                lr=step_lr,
                images_per_s=global_batch * window_steps / max(elapsed, 1e-9),
                step_s=elapsed / window_steps,
                crf_wait_s=(pool.wait_seconds - crf_wait0) / window_steps,
                data_wait_s=(batches.wait_seconds - data_wait0) / window_steps,
                peak_memory_bytes=_peak_memory_bytes(device),
            )
            row["crf_wait_share"] = row["crf_wait_s"] / max(row["step_s"], 1e-9)
            history.append(row)
            window = dict.fromkeys(window, 0.0)
            window_steps = 0
            window_start = time.perf_counter()
            crf_wait0, data_wait0 = pool.wait_seconds, batches.wait_seconds
        if iteration % checkpoint_every == 0 or is_last:
            _report(
                model, frozen, optimizer, scheduler, iteration, meta, history, rank, include_clip
            )


def _wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if world <= 1 or not dist.is_initialized():
        return _NoSync(model)
    frozen_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    # Neither broadcast nor reduce the frozen weights: every rank built the same ones.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen_names
    )
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class _NoSync(nn.Module):
    """Single-process stand-in for DDP with the same `no_sync` API."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> Any:
        return self.module(images)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _micro_step(
    ddp: nn.Module,
    batch: dict[str, torch.Tensor],
    batches: _Batches,
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
    q = torch.from_numpy(pool.result(pending)).to(device)
    boundary = boundary_loss(
        probs,
        q,
        prob_floor=config.loss.prob_clamp,
        ratio_min=config.loss.ratio_min,
        ratio_max=config.loss.ratio_max,
    )
    (grad_boundary,) = torch.autograd.grad(boundary / accumulation, [logits], retain_graph=True)
    # One backward pass through the model for all three losses.
    torch.autograd.backward([logits, score_map], [grad_logits + grad_boundary, grad_score])
    seeding_value, boundary_value = float(seeding.detach()), float(boundary.detach())
    auxiliary_value = float(auxiliary.detach())
    terms = {
        "loss": seeding_value + boundary_value + config.loss.aux_weight * auxiliary_value,
        "loss_seeding": seeding_value,
        "loss_boundary": boundary_value,
        "loss_auxiliary": auxiliary_value,
    }
    return terms, next_batch


def _log_row(
    window: dict[str, float], steps: int, start: float, device: torch.device, world: int
) -> dict[str, Any]:
    """Window means of the loss terms, averaged over the workers."""
    keys = sorted(window)
    values = torch.tensor([window[k] / steps for k in keys], dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        values = values.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(values)
        values = values.cpu() / world
    return {k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}


def _report(
    model: nn.Module,
    frozen: set[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    meta: dict[str, Any],
    history: list[dict[str, Any]],
    rank: int,
    include_clip: bool,
) -> None:
    """`ray.train.report` on every worker; only rank 0 attaches the checkpoint."""
    import ray.train

    metrics = {"iteration": iteration}
    if history:
        metrics.update({k: v for k, v in history[-1].items() if isinstance(v, int | float)})
        metrics["iteration"] = iteration
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    directory = tempfile.mkdtemp(prefix="weakclip-ckpt-")
    try:
        ckpt.save_checkpoint(
            directory,
            model=model,
            frozen=frozen,
            optimizer=optimizer,
            scheduler=scheduler,
            iteration=iteration,
            meta=meta,
            metrics=history,
            include_clip=include_clip,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


__all__ = ["InjectedFailure", "lr_at", "train_loop_per_worker"]
