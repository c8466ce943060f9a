"""A process pool per training worker that computes the boundary-loss CRF targets Q.

Q = CRF(P) needs the current step's predictions P (docs/METHOD.md), so what can overlap with it
does in `pipelines.train.loop`: the batch is cut into one chunk per pool process (pydensecrf
holds the GIL, so threads would not help) while the training process computes the other losses
and fetches the next batch; the time spent blocked on the pool is logged (`wait_seconds`).
Processes are forked once, before the loop starts its collective communication.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.seeds import crf_kwargs
from weakclip.config import CRFConfig
from weakclip.crf import boundary_crf_targets


def crf_params(crf: CRFConfig, *, prob_floor: float) -> dict[str, float]:
    """Keyword arguments of `boundary_crf_targets` for a CRF config."""
    return {**crf_kwargs(crf), "prob_floor": prob_floor}


def _noop() -> int:
    return 0


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Pool-process initializer: the kernel kills this process when its parent dies.

    A forked child holds copies of every socket of the Ray worker that forked it (raylet,
    gRPC, gloo). Were the worker killed (OOM killer, SIGKILL) with its children alive, nobody
    would see those sockets close: measured, Ray then took 7.5 minutes to notice the dead
    training worker and restart the group from the last checkpoint, instead of seconds.
    Linux only (elsewhere a no-op). The signal follows the forking thread: the pool must be
    created, and closed, by the thread that runs the training loop.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@dataclass
class PendingTargets:
    """CRF targets of one batch being computed: one future per chunk of images."""

    futures: list[Future[np.ndarray]]
    submitted: float  # time.perf_counter() at submission


class CRFPool:
    """Computes `boundary_crf_targets` over a batch in `processes` worker processes (0: in the
    calling process). `params` are `crf_params`; `absent_tolerance` is that of
    `weakclip.crf.boundary_crf_target` (None keeps the class restriction exact up to the floor)."""

    def __init__(
        self, *, processes: int, params: dict[str, float], absent_tolerance: float | None = None
    ) -> None:
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.processes = processes
        self.params: dict[str, Any] = dict(params)
        if absent_tolerance is not None:
            self.params["absent_tolerance"] = absent_tolerance
        self.wait_seconds = 0.0  # time the caller spent blocked in `result`
        self.compute_seconds = 0.0  # submission-to-completion time of finished batches
        self._executor: ProcessPoolExecutor | None = None
        if processes > 0:
            self._executor = ProcessPoolExecutor(
                max_workers=processes,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
            # Start every process now, not inside the first training step.
            for future in [self._executor.submit(_noop) for _ in range(processes)]:
                future.result()

    def submit(
        self, images: np.ndarray, probs: np.ndarray, class_masks: np.ndarray | None
    ) -> PendingTargets:
        """Starts the CRF of a batch: B x h x w x 3 uint8 RGB at the loss resolution, B x K x h x w
        float32 probabilities (on the CPU), B x K bool class masks or None; a handle for `result`.
        """
        batch = images.shape[0]
        start = time.perf_counter()
        if self._executor is None:
            future: Future[np.ndarray] = Future()
            future.set_result(boundary_crf_targets(images, probs, class_masks, **self.params))
            return PendingTargets([future], start)
        chunks = np.array_split(np.arange(batch), min(self.processes, batch))
        futures = [
            self._executor.submit(
                boundary_crf_targets,
                images[index],
                probs[index],
                None if class_masks is None else class_masks[index],
                **self.params,
            )
            for index in chunks
            if len(index)
        ]
        return PendingTargets(futures, start)

    def result(self, pending: PendingTargets) -> np.ndarray:
        """Waits for a batch's targets; B x K x h x w float32 Q in submission order."""
        start = time.perf_counter()
        parts = [future.result() for future in pending.futures]
        end = time.perf_counter()
        self.wait_seconds += end - start
        self.compute_seconds += end - pending.submitted
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        """Stops the pool processes."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
