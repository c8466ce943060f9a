"""Worker side of every Ray Train loop (train and retrain): `train_steps`, the loop skeleton
with the model's micro-step injected, and its parts (the test-only failure switch included:
`pipelines.training.run.FAIL_ENV`)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipelines.progress import Progress
from pipelines.training import checkpoint as ckpt
from pipelines.training import tensorboard as tb


class InjectedFailure(RuntimeError):
    """The test-only failure switch fired (WEAKCLIP_TEST_FAIL_AT_ITERATION)."""


def worker_context(loop_config: Mapping[str, Any]) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker; CPU workers get `torch_threads`."""
    import ray.train
    import ray.train.torch

    _quiet_report_lines()
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and loop_config.get("torch_threads"):
        torch.set_num_threads(int(loop_config["torch_threads"]))
    return context.get_world_rank(), context.get_world_size(), device


def _quiet_report_lines() -> None:
    """Ray Train logs every `ray.train.report` of every worker at INFO (the whole report,
    metrics and checkpoint path) through a logger named after its source file, which its
    `LoggingConfig` level does not reach; this worker keeps them at WARNING and above."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quieten
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


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

    @staticmethod
    def iteration(restored: Restored | None) -> int:
        """The iteration training goes on from: the checkpoint's, 0 for a fresh start."""
        return int(restored.state["iteration"]) if restored else 0


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
    """The worker's stream of micro-batches, with the time spent waiting for them.

    With `fetch_first`, a thread asks for the first batch at once: the data pipeline's start
    (its coordinator, its first read and augment tasks) then overlaps the model's build.
    """

    def __init__(
        self, iterator: Iterator[dict[str, torch.Tensor]], *, fetch_first: bool = False
    ) -> None:
        self._iterator = iterator
        self.wait_seconds = 0.0
        self._first: concurrent.futures.Future[dict[str, torch.Tensor] | None] | None = None
        if fetch_first:
            pool = concurrent.futures.ThreadPoolExecutor(1, "first-batch")
            self._first = pool.submit(self._pull)
            pool.shutdown(wait=False)  # the thread ends with the fetch

    def _pull(self) -> dict[str, torch.Tensor] | None:
        try:
            return next(self._iterator)
        except StopIteration:
            return None

    def next(self) -> dict[str, torch.Tensor] | None:
        start = time.perf_counter()
        try:
            if self._first is not None:
                first, self._first = self._first, None
                return first.result()
            return self._pull()
        finally:
            self.wait_seconds += time.perf_counter() - start


def open_batches(loop_config: Mapping[str, Any], *, rank: int, start: int, seed: int) -> Batches:
    """This worker's shard of the `train` dataset as micro-batches of CPU tensors, the first
    already asked for (`Batches(fetch_first=True)`): call it before building the model, after
    forking any process (it starts threads)."""
    import ray.train

    micro = int(loop_config["micro_batch_size"])
    stream = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=micro,
        drop_last=True,
        device="cpu",
        prefetch_batches=2,
        local_shuffle_buffer_size=max(micro * 4, 16),
        local_shuffle_seed=seed + start + rank,
    )
    return Batches(iter(stream), fetch_first=True)


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


def all_reduce_sum(values: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """`values` summed over the workers (a collective: call on every rank), on the CPU."""
    if world > 1 and dist.is_initialized():
        values = values.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(values)
    return values.cpu()


class LogWindow:
    """Sums of scalars over the optimizer steps (`steps`) since the last logged row, and the
    row itself. `waits` name counters of seconds spent waiting (e.g. for data); a row holds
    their growth per step over the window."""

    def __init__(
        self,
        waits: Mapping[str, Callable[[], float]],
        *,
        global_batch: int,
        device: torch.device,
        world: int,
    ) -> None:
        self._waits = dict(waits)
        self._global_batch, self._device, self._world = global_batch, device, world
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = collections.defaultdict(float)
        self.steps = 0
        self._start = time.perf_counter()
        self._wait0 = {name: read() for name, read in self._waits.items()}

    def add(self, terms: Mapping[str, float], *, scale: float = 1.0) -> None:
        """Adds one micro-step's scalars (times `scale`)."""
        for key, value in terms.items():
            self.sums[key] += value * scale

    def row(self, *, iteration: int, lr: float) -> dict[str, Any]:
        """The window's row (means over steps and workers, rates, timings); starts a new one."""
        steps, keys = max(self.steps, 1), sorted(self.sums)
        values = torch.tensor([self.sums[k] / steps for k in keys], dtype=torch.float64)
        values = all_reduce_sum(values, self._device, self._world) / self._world
        row: dict[str, Any] = dict(zip(keys, values.tolist(), strict=True))
        elapsed = time.perf_counter() - self._start
        row.update(
            iteration=iteration,
            lr=lr,
            images_per_s=self._global_batch * steps / max(elapsed, 1e-9),
            step_s=elapsed / steps,
            peak_memory_bytes=peak_memory_bytes(self._device),
        )
        for name, read in self._waits.items():
            row[name] = (read() - self._wait0[name]) / steps
        self._reset()
        return row


class Events:
    """Rank 0's TensorBoard segments of a run restored at `start` (nothing without a
    `directory`): the segments past `start` are deleted first, their rows will come again."""

    def __init__(self, directory: Any, start: int) -> None:
        self._directory, self._written = directory, start
        self._last = time.monotonic()
        if directory is not None:
            tb.prune_segments(directory, after=start)

    def due(self) -> bool:
        """Whether a segment is due at a logged row (`tensorboard.SEGMENT_SECONDS` passed)."""
        return self._directory is not None and (time.monotonic() - self._last >= tb.SEGMENT_SECONDS)

    def write(self, history: list[dict[str, Any]], iteration: int) -> None:
        """The segment of the rows logged after the last one, up to `iteration`."""
        if self._directory is None or iteration <= self._written:
            return
        tb.write_segment(self._directory, history, after=self._written, last=iteration)
        self._written, self._last = iteration, time.monotonic()


Step = Callable[
    [nn.Module, dict[str, torch.Tensor], Batches, int],
    tuple[dict[str, float], dict[str, torch.Tensor] | None],
]


@dataclass(frozen=True)
class Schedule:
    """AdamW and its warm-up + cosine schedule (`lr_at`) over `total` steps."""

    lr: float
    min_lr: float
    warmup: int
    total: int
    weight_decay: float

    @classmethod
    def of(cls, train: Any) -> Schedule:
        """The schedule of a training config (WeakCLIP's `train`, or `RetrainConfig`)."""
        warmup, total = train.effective_warmup_iterations, train.iterations
        return cls(train.lr, train.effective_min_lr, warmup, total, train.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """`lr_at` as a scheduler of an optimizer whose base learning rate is `lr`."""
        factor = functools.partial(
            lr_at, lr=self.lr, min_lr=self.min_lr, warmup=self.warmup, total=self.total
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: factor(i) / self.lr)


def _stdout_line(line: str) -> None:
    """One line to this worker's stdout (and so, once, to the driver's log): Ray Train's
    patched `print` would also send it through the root logger, a second copy."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_steps(
    loop_config: Mapping[str, Any],
    *,
    context: tuple[int, int, torch.device],
    model: nn.Module,
    restored: Restored | None,
    train: Any,
    meta: Mapping[str, Any],
    step: Step,
    waits: Mapping[str, Callable[[], float]] | None = None,
    frozen: Iterable[str] = (),
    include_frozen: bool = False,
    finish_row: Callable[[dict[str, Any]], None] | None = None,
    final_meta: Callable[[], Mapping[str, Any]] | None = None,
    stage: str = "train",
    batches: Batches,
) -> None:
    """The loop every training stage runs, from `restored` (or the start) to the `iterations`
    of `train` (a training config: its `Schedule.of`).

    Per optimizer step, `accumulation_steps` calls of `step(ddp, batch, batches, accumulation)`
    (backward included; DDP syncs on the last) return the micro-step's scalars (the same keys
    each call) and the next batch; then AdamW and the scheduler step. Rows of window means are
    logged every `log_every` steps, checkpoints reported every `checkpoint_every` (and at the
    end, with `final_meta()` in the meta: a collective, called on every rank). A run restored at
    its last iteration reports again (an export interrupted after training). With the loop
    config's `tensorboard` directory (a `Location`), rank 0 writes the logged rows there as they
    come (`pipelines.training.tensorboard`). Rank 0 prints `stage`'s progress line (iterations,
    rate, ETA, the last logged loss) every 10 s (`pipelines.progress`). `batches`: the stream
    `open_batches` opened before the model was built.
    """
    import ray.train

    rank, world, device = context
    schedule = Schedule.of(train)
    history: list[dict[str, Any]] = list(restored.history) if restored else []
    start = Restored.iteration(restored)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = schedule.scheduler(optimizer)
    if restored is not None:
        optimizer.load_state_dict(restored.state["optimizer"])
        scheduler.load_state_dict(restored.state["scheduler"])
    ddp = wrap_ddp(model, device, world)
    micro = int(loop_config["micro_batch_size"])
    accumulation = int(loop_config["accumulation_steps"])
    waits = {**(waits or {}), "data_wait_s": lambda: batches.wait_seconds}
    window = LogWindow(waits, global_batch=micro * accumulation * world, device=device, world=world)
    events = Events(loop_config.get("tensorboard") if rank == 0 else None, start)
    progress = Progress(stage, schedule.total, unit="iterations", report=_stdout_line, start=start)

    def report(iteration: int) -> None:
        """`ray.train.report` on every worker of the last logged row's numbers and `iteration`;
        only rank 0 writes the checkpoint and attaches it."""
        extra = final_meta() if final_meta and iteration == schedule.total else {}  # every rank
        last = history[-1] if history else {}
        metrics = {k: v for k, v in last.items() if isinstance(v, int | float)}
        metrics["iteration"] = iteration
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        events.write(history, iteration)  # before the checkpoint: a restart prunes past it
        with tempfile.TemporaryDirectory(prefix="weakclip-ckpt-") as directory:
            ckpt.save_checkpoint(
                directory,
                model=model,
                frozen=frozen,
                optimizer=optimizer,
                scheduler=scheduler,
                iteration=iteration,
                meta={**meta, **extra},
                metrics=history,
                include_clip=include_frozen,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    iteration = start
    if iteration >= schedule.total:
        report(iteration)
    next_batch = batches.next() if iteration < schedule.total else None
    while iteration < schedule.total:
        maybe_fail(loop_config, iteration, rank, world)
        optimizer.zero_grad(set_to_none=True)
        for micro_step in range(accumulation):
            batch = next_batch
            if batch is None:
                raise RuntimeError(f"training data ran out at iteration {iteration}")
            last_micro = micro_step == accumulation - 1
            with contextlib.nullcontext() if last_micro else ddp.no_sync():
                terms, next_batch = step(ddp, batch, batches, accumulation)
            window.add(terms, scale=1 / accumulation)
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        iteration += 1
        window.steps += 1
        is_last = iteration == schedule.total
        if iteration % int(loop_config["log_every"]) == 0 or is_last:
            row = window.row(iteration=iteration, lr=step_lr)
            if finish_row is not None:
                finish_row(row)
            history.append(row)
            if events.due():
                events.write(history, iteration)
        if rank == 0:
            loss = history[-1].get("loss") if history else None
            progress.update(iteration, "" if loss is None else f"loss {loss:.4f}")
        if iteration % int(loop_config["checkpoint_every"]) == 0 or is_last:
            report(iteration)
