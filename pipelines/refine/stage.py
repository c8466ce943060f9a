"""Refine stage: ingested CAMs → dense-CRF seed labels on Ray Data CPU workers (docs/METHOD.md).

Reads the ingest shards the input manifest lists, in units of consecutive row groups
(`pipelines.refine.units`, docs/ARCHITECTURE.md "The unit of work"), each refined as Ray tasks
over parts of its rows
(`pipelines.parts`: shorter parts near the end, so that no core idles on a last long unit);
writes `schema.REFINE_COLUMNS`. Metrics (rows with
ground truth): confusion matrices of CAM argmax and seeds, with per-split mIoU beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from pipelines import units as work
from pipelines.io.manifest import Manifest, StageOutput, StageState, read_manifest
from pipelines.io.storage import StorageOptions, resolve
from pipelines.parts import run_parts
from pipelines.progress import Progress
from pipelines.refine.units import (
    WorkUnit,
    build_metrics,
    enumerate_units,
    finish_unit,
    refine_part,
)
from pipelines.seeds import METHODS, SeedConfig
from weakclip.config import check_fields


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
    # rows per unit (one shard and one record; whole input row groups, at most this many
    # rows); None: sized for ~96 MiB shards from the input's footers
    rows_per_unit: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        check_fields(self, "in [0, 1]", "max_error_fraction")
        if self.rows_per_unit is not None:
            check_fields(self, ">= 1", "rows_per_unit")
        self.seed_config()  # SeedConfig names the offending field

    def seed_config(self) -> SeedConfig:
        """The full recipe: `method`'s published values with the given fields over them."""
        stage_only = ("method", "max_error_fraction", "rows_per_unit")
        given = {k: v for k, v in asdict(self).items() if k not in stage_only and v is not None}
        return SeedConfig.for_method(self.method, **given)  # type: ignore[arg-type]


def stage_config(config: RefineConfig) -> dict[str, Any]:
    """What fingerprints a refine output: the resolved recipe and the rows per unit as given
    (None: sized from the input, the same for the same input); not the error tolerance, so a
    run that failed on too many bad rows can be resumed with a higher one."""
    return {"seeds": asdict(config.seed_config()), "rows_per_unit": config.rows_per_unit}


@dataclass(frozen=True)
class RefineResult(work.StageResult):
    """`StageResult` with the timings of the units this call ran."""

    crf_seconds: float = 0.0  # Σ refine_seed wall time
    task_seconds: float = 0.0  # Σ task wall time
    units_run: int = 0
    rows_run: int = 0  # input rows


def run_refine(
    input_uri: str,
    output_uri: str,
    config: RefineConfig,
    *,
    progress_every: int | None = None,
    storage: StorageOptions | None = None,
    num_cpus_per_task: float = 1.0,
    overwrite: bool = False,
    report: Callable[[str], Any] = print,
) -> RefineResult:
    """Runs the refine stage on the current Ray instance: a completed ingest output at
    `input_uri` → `output_uri`, a progress line to `report` every `progress_every` images
    (default: one every 10 s, `pipelines.progress`); `overwrite` replaces an output made with
    another config or input.

    Raises:
        IncompleteOutputError: the input has no `_SUCCESS`.
        ValueError: the input is not an ingest output, or holds no rows.
        StageConflictError: the output holds another run (and not `overwrite`).
    """
    started = time.monotonic()
    input_loc, output_loc = resolve(input_uri, storage), resolve(output_uri, storage)
    source = read_manifest(input_loc, stages=("ingest",))
    seed_config = config.seed_config()
    out = StageOutput.open(
        output_loc,
        stage="refine",
        config=stage_config(config),
        inputs=[source.input_ref()],
        overwrite=overwrite,
    )
    if out.state is StageState.DONE:
        return RefineResult(**work.already_done(out, report), seconds=time.monotonic() - started)
    units, rows_per_unit = enumerate_units(input_loc, source, config.rows_per_unit)
    total_rows = sum(u.rows for u in units)
    if total_rows == 0:
        raise ValueError(f"{input_loc.uri} lists no rows to refine")
    records = work.resume(out, {u.name: u for u in units}, work.record_matches)
    report(
        f"refine: {total_rows} rows in {len(units)} units of up to {rows_per_unit} rows from "
        f"{input_loc.uri}; method "
        f"{seed_config.method}, class space {source.class_space} ({len(source.class_names)})"
        + (f"; resuming: {len(records)} of {len(units)} units already done" if records else "")
    )
    todo = [asdict(u) for u in units if u.name not in records]
    num_classes = len(source.class_names)
    total = sum(u["rows"] for u in todo)
    progress = Progress("refine", total, report=report, every_items=progress_every)
    done = {"rows": 0, "units": 0}

    def part_done(rows: int) -> None:
        done["rows"] += rows
        if done["rows"] < total:  # the last line comes once every unit is written
            progress.update(done["rows"], f"{done['units']}/{len(todo)} units")

    tasks = run_parts(
        todo,
        refine_part,
        finish_unit,
        num_cpus=num_cpus_per_task,
        part_kwargs=dict(input_loc=input_loc, config=seed_config, num_classes=num_classes),
        finish_kwargs=dict(output_loc=output_loc, num_classes=num_classes),
        on_part=part_done,
    )
    timing = _collect(tasks, len(todo), records, done)
    progress.update(done["rows"], f"{done['units']}/{len(todo)} units")
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
    """Sums the units' records and their metrics; `units.gate_and_commit`."""
    ordered, space = [records[u.name] for u in units], source.class_space
    tally = work.tally_records(ordered)
    bg_threshold = config.seed_config().bg_threshold
    metrics = build_metrics(
        ordered, class_names=source.class_names, class_space=space, bg_threshold=bg_threshold
    )
    return work.gate_and_commit(
        "refine",
        out,
        tally,
        {"input": sum(u.rows for u in units)},
        max_error_fraction=config.max_error_fraction,
        started=started,
        result=partial(RefineResult, **timing),
        summary=(f"{tally.output} rows", ""),
        report=report,
        class_names=source.class_names,
        class_space=space,
        metrics=metrics,
        scores={"cam_argmax": "CAM argmax", "seeds": "seeds"},
        units=len(units),
    )


def _collect(
    tasks: Iterable[dict[str, Any]],
    count: int,
    records: dict[str, dict[str, Any]],
    done: dict[str, int],
) -> dict[str, Any]:
    """Files the records of the `count` units run into `records` (counting them in `done`);
    returns their timings."""
    timing = dict(crf_seconds=0.0, task_seconds=0.0, units_run=count, rows_run=0)
    for record in tasks:
        records[record["unit"]] = record
        done["units"] += 1
        timing["rows_run"] += record["input_rows"]
        timing["crf_seconds"] += record["crf_s"]
        timing["task_seconds"] += record["task_s"]
    return timing
