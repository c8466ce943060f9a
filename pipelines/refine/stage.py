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
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.io.manifest import FileEntry, StageOutput, StageState, read_manifest
from pipelines.io.storage import StorageOptions, redact, resolve
from pipelines.refine.units import build_metrics, enumerate_units, read_records, refine_units
from pipelines.seeds import METHODS, SeedConfig

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
    import ray

    started = time.monotonic()
    input_loc = resolve(input_uri, storage)
    output_loc = resolve(output_uri, storage)
    source = read_manifest(input_loc)
    if source.stage != "ingest":
        raise ValueError(f"{input_loc.uri} is a {source.stage!r} output, not an ingest output")
    seed_config = config.seed_config()
    out = StageOutput.open(
        output_loc,
        stage="refine",
        config=stage_config(config),
        inputs=[source.input_ref()],
        overwrite=overwrite,
    )
    if out.state is StageState.DONE:
        assert out.manifest is not None
        report(out.done_message())
        return RefineResult(
            output_loc.uri,
            dict(out.manifest.counts),
            dict(out.manifest.metrics) if out.manifest.metrics else None,
            True,
            out.done_message(),
            skipped=True,
            seconds=time.monotonic() - started,
        )

    units = enumerate_units(input_loc, source)
    total_rows = sum(u.rows for u in units)
    if total_rows == 0:
        raise ValueError(f"{input_loc.uri} lists no rows to refine")
    records = read_records(output_loc, units) if out.state is StageState.RESUME else {}
    if records:  # a record whose files vanished or changed is redone
        listed = [f["path"] for r in records.values() for f in r["files"]]
        sizes = out.existing(listed, check_parquet=False)
        records = {
            n: r
            for n, r in records.items()
            if all(sizes.get(f["path"]) == f["bytes"] for f in r["files"])
        }
    todo = [u for u in units if u.name not in records]
    report(
        f"refine: {total_rows} rows in {len(units)} units from {input_loc.uri}; method "
        f"{seed_config.method}, class space {source.class_space} ({len(source.class_names)})"
        + (f"; resuming: {len(records)} of {len(units)} units already done" if records else "")
    )
    every = progress_every or max(1, len(todo) // 20)
    crf_s = task_s = 0.0
    rows_run = 0
    run_started = time.monotonic()
    if todo:
        items = [{"unit": json.dumps(asdict(u))} for u in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            refine_units,
            batch_size=1,
            num_cpus=num_cpus_per_task,
            fn_kwargs={
                "input_loc": input_loc,
                "output_loc": output_loc,
                "config": seed_config,
                "num_classes": len(source.class_names),
            },
        )
        done = 0
        for row in ds.iter_rows():
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

    ordered = [records[u.name] for u in units]
    files = [FileEntry(**f) for r in ordered for f in r["files"]]
    good = sum(r["output"] for r in ordered)
    bad = sum(r["quarantined"] for r in ordered)
    counts = {"input": total_rows, "output": good, "quarantined": bad}
    if good + bad != total_rows:
        raise RuntimeError(f"row counts do not add up: {counts}")
    reasons: Counter[str] = Counter()
    for r in ordered:
        reasons.update(r["reasons"])
    metrics = build_metrics(
        ordered,
        class_names=source.class_names,
        class_space=source.class_space,
        bg_threshold=seed_config.bg_threshold,
    )
    timing = dict(
        seconds=time.monotonic() - started,
        crf_seconds=crf_s,
        task_seconds=task_s,
        units_run=len(todo),
        rows_run=rows_run,
    )
    fraction = bad / total_rows
    summary = ", ".join(f"{k}: {v}" for k, v in reasons.most_common(5))
    if fraction > config.max_error_fraction:
        message = (
            f"{bad} of {total_rows} rows quarantined ({fraction:.1%} > max_error_fraction "
            f"{config.max_error_fraction:.1%}): {summary}; see "
            f"{output_loc.child('quarantine').uri} (outputs kept, no _SUCCESS written)"
        )
        report(f"refine: FAILED: {redact(message)}")
        return RefineResult(output_loc.uri, counts, metrics, False, message, **timing)
    out.commit(
        files=files,
        counts=counts,
        class_names=source.class_names,
        class_space=source.class_space,
        metrics=metrics,
        extra={"quarantine_reasons": dict(reasons), "units": len(units)},
    )
    scores = ""
    if metrics is not None:
        scores = (
            f"; mIoU ({source.class_space}, {metrics['gt_images']} images with GT): CAM argmax "
            f"{_pct(metrics['cam_argmax']['miou'])}, seeds {_pct(metrics['seeds']['miou'])}"
        )
    message = (
        f"refine: {good} rows, {bad} quarantined{(' (' + summary + ')') if summary else ''}"
        f"{scores}; {output_loc.uri} ({timing['seconds']:.0f} s)"
    )
    report(message)
    return RefineResult(output_loc.uri, counts, metrics, True, message, **timing)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
