"""Worker-side pieces every Ray Train loop of this project shares (train and retrain).

- `worker_context`: rank, world size and device (CPU threads set for CPU workers);
- the learning-rate schedule (linear warm-up, then cosine to a floor; docs/METHOD.md);
- `fetch_weights`: a local, digest-checked copy of a weights file named by a `Location`;
- `restore_checkpoint`: what Ray Train hands a restarted or resumed worker, signature-checked;
- `train_batches`: the worker's micro-batch stream (`Batches`, with the time spent waiting);
- `wrap_ddp`: DDP over the trainable parameters (a no-op stand-in for one process);
- `LogWindow`: window means of logged scalars, averaged over the workers, with timings;
- `report_checkpoint`: `ray.train.report` on every worker, the checkpoint from rank 0;
- `maybe_fail`: the test-only failure switch (`pipelines.training.run.FAIL_ENV`).
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipelines.io.storage import Location
from pipelines.training import checkpoint as ckpt


class InjectedFailure(RuntimeError):
    """The test-only failure switch fired (WEAKCLIP_TEST_FAIL_AT_ITERATION)."""


def worker_context(loop_config: Mapping[str, Any]) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker; CPU workers get `torch_threads`."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and loop_config.get("torch_threads"):
        torch.set_num_threads(int(loop_config["torch_threads"]))
    return context.get_world_rank(), context.get_world_size(), device


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(iteration: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of 0-based step `iteration`: linear warm-up, then cosine to min_lr."""
    if warmup > 0 and iteration < warmup:
        return lr * (iteration + 1) / warmup
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _lr_factor(iteration: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    return lr_at(iteration, lr=lr, min_lr=min_lr, warmup=warmup, total=total) / lr


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_at` as a scheduler of an optimizer whose base learning rate is `lr`."""
    factor = functools.partial(_lr_factor, lr=lr, min_lr=min_lr, warmup=warmup, total=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fetch_weights(location: Location | None, sha256: str | None, *, what: str) -> str | None:
    """A local copy of a weights file, checked against the digest the driver recorded.

    Remote files are cached under the temporary directory by digest, so the workers of one
    node download a file once.

    Raises:
        ValueError: the file's digest is no longer `sha256` (it changed since the run started).
    """
    if location is None:
        return None
    if location.is_local:
        path = location.path
    else:
        suffix = os.path.splitext(location.path)[1]
        cache = os.path.join(tempfile.gettempdir(), "weakclip-weights-cache")
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
            raise ValueError(f"{what} {location.uri} changed since the run started")
    return path


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this worker: CUDA allocations, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the whole worker process, model and data included.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def maybe_fail(loop_config: Mapping[str, Any], iteration: int, rank: int, world: int) -> None:
    """Raises `InjectedFailure` once, on the last rank, at `fail_at_iteration` (tests only)."""
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


@dataclass(frozen=True)
class Restored:
    """A checkpoint's contents as a restarted or resumed worker needs them."""

    state: dict[str, Any]  # `checkpoint.read_train_state`: model, optimizer, scheduler, iteration
    history: list[dict[str, Any]]  # logged rows so far
    clip: dict[str, torch.Tensor] | None  # stored random-init frozen weights, if any

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])


def restore_checkpoint(signature: Any) -> Restored | None:
    """The checkpoint Ray Train restores this worker from, or None for a fresh start.

    Raises:
        ValueError: the checkpoint's run signature is not `signature`.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        meta = ckpt.read_meta(directory)
        if meta.get("signature") != signature:
            raise ValueError("the checkpoint belongs to a different run configuration")
        return Restored(
            state=ckpt.read_train_state(directory),
            history=ckpt.read_metrics(directory),
            clip=ckpt.read_clip_state(directory),
        )


class Batches:
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


def train_batches(micro: int, *, seed: int, start_iteration: int, rank: int) -> Batches:
    """The worker's shard of the `train` dataset in micro-batches (CPU tensors)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    return Batches(
        iter(
            shard.iter_torch_batches(
                batch_size=micro,
                drop_last=True,
                device="cpu",
                prefetch_batches=2,
                local_shuffle_buffer_size=max(micro * 4, 16),
                local_shuffle_seed=seed + start_iteration + rank,
            )
        )
    )


class NoSync(nn.Module):
    """Single-process stand-in for DDP with the same `no_sync` API."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> Any:
        return self.module(images)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """DDP over the trainable parameters; frozen ones are neither broadcast nor reduced."""
    if world <= 1 or not dist.is_initialized():
        return NoSync(model)
    frozen_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen_names:
        # Every rank built the same frozen weights.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, frozen_names
        )
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def mean_over_workers(
    window: Mapping[str, float], steps: int, device: torch.device, world: int
) -> dict[str, float]:
    """Window means (`window[k] / steps`) of logged scalars, averaged over the workers."""
    keys = sorted(window)
    values = torch.tensor([window[k] / steps for k in keys], dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        values = values.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(values)
        values = values.cpu() / world
    return {k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}


class LogWindow:
    """Sums of scalars over the steps since the last logged row, and the row itself.

    `waits` name counters of seconds spent waiting (e.g. for data); a row holds their growth
    per step over the window.
    """

    def __init__(self, keys: Iterable[str], waits: Mapping[str, Callable[[], float]]) -> None:
        self._keys = tuple(keys)
        self._waits = dict(waits)
        self._reset()

    def _reset(self) -> None:
        self.sums = dict.fromkeys(self._keys, 0.0)
        self.steps = 0
        self._start = time.perf_counter()
        self._wait0 = {name: read() for name, read in self._waits.items()}

    def add(self, terms: Mapping[str, float], *, scale: float = 1.0) -> None:
        """Adds one micro-step's scalars (times `scale`)."""
        for key, value in terms.items():
            self.sums[key] += value * scale

    def step(self) -> None:
        """Counts one optimizer step."""
        self.steps += 1

    def row(
        self, *, iteration: int, lr: float, global_batch: int, device: torch.device, world: int
    ) -> dict[str, Any]:
        """The window's row (means over steps and workers, rates, timings); starts a new one."""
        steps = max(self.steps, 1)
        row: dict[str, Any] = mean_over_workers(self.sums, steps, device, world)
        elapsed = time.perf_counter() - self._start
        row.update(
            iteration=iteration,
            lr=lr,
            images_per_s=global_batch * steps / max(elapsed, 1e-9),
            step_s=elapsed / steps,
            peak_memory_bytes=peak_memory_bytes(device),
        )
        for name, read in self._waits.items():
            row[name] = (read() - self._wait0[name]) / steps
        self._reset()
        return row


def report_checkpoint(
    model: nn.Module,
    *,
    frozen: Iterable[str],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    meta: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    rank: int,
    include_frozen: bool,
) -> None:
    """`ray.train.report` on every worker; only rank 0 attaches the checkpoint.

    The reported metrics are the last logged row's numbers and `iteration`.
    """
    import ray.train

    metrics: dict[str, Any] = {}
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
            include_clip=include_frozen,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


__all__ = [
    "Batches",
    "InjectedFailure",
    "LogWindow",
    "NoSync",
    "Restored",
    "autocast_for",
    "fetch_weights",
    "lr_at",
    "maybe_fail",
    "mean_over_workers",
    "peak_memory_bytes",
    "report_checkpoint",
    "restore_checkpoint",
    "train_batches",
    "warmup_cosine_scheduler",
    "worker_context",
    "wrap_ddp",
]
