"""Refine stage: ingested CAMs → dense-CRF seed labels on Ray Data CPU workers (docs/METHOD.md).

Reads the ingest columns (`pipelines.io.schema.INGEST_COLUMNS`) of the shards the input manifest
lists, and only those; writes the refine columns (`schema.REFINE_COLUMNS`: `image_id`, `image`,
`height`, `width`, `labels`, `seed`, `gt`, `split`), the seed as a VOC-palette PNG.

How the work is cut: the driver reads each listed shard's Parquet footer (metadata only) and
makes one work unit per (shard, row group). Ray Data runs one task per unit (`map_batches` with
`batch_size=1`, CPUs per task chosen by the job): the task reads its row group, decodes image
and CAM, computes the CAM argmax and the CRF seed (`pipelines.seeds`), and writes
`shards/<shard stem>-rg<NNNN>.parquet`, `quarantine/<same>.parquet` for rows it could not
refine, and last a completion record `_units/<same>.json` (rows, bytes, per-split confusion
matrices of CAM argmax and seeds against the ground truth, timings). Names depend only on the
input, every file is written atomically, and the manifest lists only files named by completion
records: a resumed run redoes exactly the units without a record, overwriting whatever an
interrupted attempt left, so no row appears twice and no leftover is ever listed.

The batches Ray hands the task hold only unit descriptions; pydensecrf works on arrays decoded
inside the task, which are writable and C-contiguous (no zero-copy read-only buffers).

Metrics (when any row has ground truth): confusion matrices over valid GT pixels in the input's
full class space (`class_space` of the ingest manifest), summed over every row with GT in all
splits, with per-split mIoU beside them; `seeds` are what training uses (the train split).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.io.manifest import Manifest, StageOutput, StageState, read_manifest
from pipelines.io.storage import Location, StorageOptions, resolve
from pipelines.refine.units import (
    WorkUnit,
    build_metrics,
    enumerate_units,
    record_matches,
    refine_units,
)
from pipelines.seeds import METHODS, SeedConfig
from pipelines.units import Tally, already_done, error_gate, pct, resume, run_tasks, tally_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig:
    """Options of the refine stage (CLI flags and `--config` fields).

    Every CRF field left None takes the published value of `method` (`SeedConfig.for_method`).
    """

    method: str = "weaktr"  # "weaktr" (label unary) or "clip-es" (softmax unary + ignore)
    bg_threshold: float | None = None  # background plane; also the CAM-argmax baseline (0.43)
    bg_power: float | None = None  # clip-es background = (1 - max cam) ** bg_power (1)
    iterations: int | None = None  # mean-field iterations (10)
    gt_prob: float | None = None  # weaktr label-unary confidence (0.7)
    gaussian_sxy: float | None = None  # smoothness kernel std (weaktr 4, clip-es 1)
    gaussian_compat: float | None = None  # smoothness kernel weight (3)
    bilateral_sxy: float | None = None  # appearance kernel spatial std (weaktr 83, clip-es 67)
    bilateral_srgb: float | None = None  # appearance kernel colour std (weaktr 5, clip-es 3)
    bilateral_compat: float | None = None  # appearance kernel weight (weaktr 3, clip-es 4)
    confidence_threshold: float | None = None  # clip-es: CRF confidence below → 255 (0.95)
    max_error_fraction: float = 0.01  # above this share of quarantined rows the job fails

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError("max_error_fraction: must be in [0, 1]")
        self.seed_config()  # SeedConfig names the offending field

    def seed_config(self) -> SeedConfig:
        """The full recipe: `method`'s published values with the given fields over them."""
        given = {
            name: value
            for name, value in asdict(self).items()
            if name not in ("method", "max_error_fraction") and value is not None
        }
        return SeedConfig.for_method(self.method, **given)  # type: ignore[arg-type]


def stage_config(config: RefineConfig) -> dict[str, Any]:
    """What fingerprints a refine output: the resolved recipe (not the error tolerance, so a
    run that failed on too many bad rows can be resumed with a higher one)."""
    return {"seeds": asdict(config.seed_config())}


@dataclass(frozen=True)
class RefineResult:
    """What a run did; `ok` is False when the quarantined share exceeded the limit."""

    output_uri: str
    counts: dict[str, int]
    metrics: dict[str, Any] | None
    ok: bool
    message: str
    skipped: bool = False  # the output was already complete
    seconds: float = 0.0  # driver wall time of this call
    crf_seconds: float = 0.0  # Σ refine_seed wall time in the units this call ran
    task_seconds: float = 0.0  # Σ task wall time of the units this call ran
    units_run: int = 0
    rows_run: int = 0  # input rows of the units this call ran


def run_refine(
    input_uri: str,
    output_uri: str,
    config: RefineConfig,
    *,
    storage: StorageOptions | None = None,
    num_cpus_per_task: float = 1.0,
    overwrite: bool = False,
    progress_every: int | None = None,
    report: Callable[[str], Any] = print,
) -> RefineResult:
    """Runs the refine stage on the current Ray instance (see the module docstring).

    Args:
        input_uri: a completed ingest output.
        output_uri: this stage's output directory.
        config: the recipe and error tolerance.
        storage: endpoint/region of the object store (credentials come from the AWS chain).
        num_cpus_per_task: CPUs reserved per unit task; pydensecrf is single-threaded, so 1
            runs one CRF per core.
        overwrite: replace an output made with another config or input.
        progress_every: a progress line every this many units (default: about 20 lines).
        report: progress sink, one line per call.

    Raises:
        IncompleteOutputError: the input has no `_SUCCESS`.
        ValueError: the input is not an ingest output, or holds no rows.
        StageConflictError: the output holds another run (and not `overwrite`).
    """
    started = time.monotonic()
    input_loc, output_loc = resolve(input_uri, storage), resolve(output_uri, storage)
    source = _read_ingest_manifest(input_loc)
    seed_config = config.seed_config()
    out = StageOutput.open(
        output_loc,
        stage="refine",
        config=stage_config(config),
        inputs=[source.input_ref()],
        overwrite=overwrite,
    )
    if out.state is StageState.DONE:
        return RefineResult(**already_done(out, report), seconds=time.monotonic() - started)

    units = enumerate_units(input_loc, source)
    total_rows = sum(u.rows for u in units)
    if total_rows == 0:
        raise ValueError(f"{input_loc.uri} lists no rows to refine")
    records = resume(out, {u.name: u for u in units}, record_matches)
    todo = [u for u in units if u.name not in records]
    report(
        f"refine: {total_rows} rows in {len(units)} units from {input_loc.uri}; method "
        f"{seed_config.method}, class space {source.class_space} ({len(source.class_names)})"
        + (f"; resuming: {len(records)} of {len(units)} units already done" if records else "")
    )
    fn_kwargs = {
        "input_loc": input_loc,
        "output_loc": output_loc,
        "config": seed_config,
        "num_classes": len(source.class_names),
    }
    timing = _run_units(todo, records, fn_kwargs, num_cpus_per_task, progress_every, report)

    return _gate_and_commit(out, source, units, records, config, timing, started, report)


def _gate_and_commit(
    out: StageOutput,
    source: Manifest,
    units: Sequence[WorkUnit],
    records: Mapping[str, dict[str, Any]],
    config: RefineConfig,
    timing: dict[str, Any],
    started: float,
    report: Callable[[str], Any],
) -> RefineResult:
    """Sums the units' records and their metrics, gates on the quarantined share, commits."""
    output_loc, total_rows = out.location, sum(u.rows for u in units)
    ordered = [records[u.name] for u in units]
    tally = tally_records(ordered)
    counts = {"input": total_rows, "output": tally.output, "quarantined": tally.quarantined}
    if tally.output + tally.quarantined != total_rows:
        raise RuntimeError(f"row counts do not add up: {counts}")
    metrics = build_metrics(
        ordered,
        class_names=source.class_names,
        class_space=source.class_space,
        bg_threshold=config.seed_config().bg_threshold,
    )
    timing["seconds"] = time.monotonic() - started
    failure = error_gate("refine", tally, total_rows, config.max_error_fraction, output_loc, report)
    if failure is not None:
        return RefineResult(output_loc.uri, counts, metrics, False, failure, **timing)
    out.commit(
        files=tally.files,
        counts=counts,
        class_names=source.class_names,
        class_space=source.class_space,
        metrics=metrics,
        extra={"quarantine_reasons": dict(tally.reasons), "units": len(units)},
    )
    message = _done_line(tally, metrics, source.class_space, output_loc.uri, timing["seconds"])
    report(message)
    return RefineResult(output_loc.uri, counts, metrics, True, message, **timing)


def _read_ingest_manifest(input_loc: Location) -> Manifest:
    source = read_manifest(input_loc)
    if source.stage != "ingest":
        raise ValueError(f"{input_loc.uri} is a {source.stage!r} output, not an ingest output")
    return source


def _run_units(
    todo: Sequence[WorkUnit],
    records: dict[str, dict[str, Any]],
    fn_kwargs: Mapping[str, Any],
    num_cpus_per_task: float,
    progress_every: int | None,
    report: Callable[[str], Any],
) -> dict[str, Any]:
    """One Ray task per unit without a record; fills `records`, returns this call's timings."""
    every = progress_every or max(1, len(todo) // 20)
    crf_s = task_s = 0.0
    rows_run = done = 0
    run_started = time.monotonic()
    items = [{"unit": json.dumps(asdict(u))} for u in todo]
    for row in run_tasks(items, refine_units, num_cpus=num_cpus_per_task, fn_kwargs=fn_kwargs):
        record = json.loads(row["record"])
        records[record["unit"]] = record
        done += 1
        rows_run += record["input_rows"]
        crf_s += record["crf_s"]
        task_s += record["task_s"]
        if done % every == 0 or done == len(todo):
            elapsed = time.monotonic() - run_started
            report(
                f"refine: {done}/{len(todo)} units, {rows_run} images, "
                f"{rows_run / max(elapsed, 1e-9):.2f} images/s ({elapsed:.0f} s)"
            )
    return dict(crf_seconds=crf_s, task_seconds=task_s, units_run=len(todo), rows_run=rows_run)


def _done_line(
    tally: Tally, metrics: Mapping[str, Any] | None, space: str, uri: str, seconds: float
) -> str:
    scores = ""
    if metrics is not None:
        scores = (
            f"; mIoU ({space}, {metrics['gt_images']} images with GT): CAM argmax "
            f"{pct(metrics['cam_argmax']['miou'])}, seeds {pct(metrics['seeds']['miou'])}"
        )
    return (
        f"refine: {tally.output} rows, {tally.quarantined} quarantined{tally.summary_suffix()}"
        f"{scores}; {uri} ({seconds:.0f} s)"
    )
