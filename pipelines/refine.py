"""Refine stage: ingested CAMs → dense-CRF seed labels on Ray Data CPU workers (SPEC.md §3).

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
import math
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import schema
from pipelines.io.codecs import (
    MAX_PIXELS,
    decode_cam_column,
    decode_rgb,
    decode_row_label_map,
    encode_label_png,
)
from pipelines.io.manifest import (
    FileEntry,
    Manifest,
    Quarantine,
    StageOutput,
    StageState,
    read_manifest,
    write_parquet,
)
from pipelines.io.rows import RowRejected, check_image_id
from pipelines.io.storage import (
    Location,
    StorageOptions,
    read_json_objects,
    redact,
    resolve,
    safe_relpath,
    write_bytes_atomic,
)
from pipelines.metrics import ConfusionAccumulator
from pipelines.seeds import METHODS, SeedConfig, cam_argmax, refine_seed

log = logging.getLogger(__name__)

REFINE_SCHEMA = pa.schema(
    [
        (schema.IMAGE_ID, pa.string()),
        (schema.IMAGE, pa.binary()),
        (schema.HEIGHT, pa.int32()),
        (schema.WIDTH, pa.int32()),
        (schema.LABELS, pa.list_(pa.int16())),
        (schema.SEED, pa.binary()),
        (schema.GT, pa.binary()),
        (schema.SPLIT, pa.string()),
    ]
)
assert tuple(REFINE_SCHEMA.names) == schema.REFINE_COLUMNS
UNIT_DIR = "_units"  # completion records of finished units (bookkeeping, not data files)
SHARD_DIR = "shards"
NO_SPLIT = "(none)"  # metrics key of rows without a split
_REQUIRED_COLUMNS = (
    schema.IMAGE_ID,
    schema.IMAGE,
    schema.HEIGHT,
    schema.WIDTH,
    schema.LABELS,
    schema.CAM,
    schema.CAM_CLASSES,
    schema.GT,
)
_FOOTER_THREADS = 16


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
class WorkUnit:
    """One task: a row group of an input shard, and the name of everything it writes."""

    name: str  # "<shard stem>-rg<NNNN>"
    path: str  # input shard, relative to the input directory
    row_group: int
    rows: int


# ---------------------------------------------------------------------------------------------
# One row (pure: bytes and numbers in, bytes and arrays out)


@dataclass(frozen=True)
class RefinedRow:
    """A refined row: its refine-shard columns and what evaluation needs."""

    columns: dict[str, Any]  # the REFINE_COLUMNS of the output row
    seed: np.ndarray  # H x W uint8 seed labels, 255 = ignore
    argmax: np.ndarray  # H x W uint8 CAM argmax (the unrefined baseline)
    gt: np.ndarray | None  # H x W uint8 ground truth, 255 = ignore
    crf_seconds: float  # wall time inside `refine_seed`


def refine_row(row: Mapping[str, Any], *, config: SeedConfig, num_classes: int) -> RefinedRow:
    """Seed labels and CAM argmax of one ingest row.

    Args:
        row: the ingest columns of one row (`cam` as float16 bytes, C x H x W).
        config: the seed recipe; `bg_threshold` is also the argmax baseline's background.
        num_classes: K, size of the class space (CAM classes and GT must lie inside it).

    Returns:
        The refined row; `columns["seed"]` is the seed as a VOC-palette PNG.

    Raises:
        RowRejected: undecodable image, CAM or GT, mismatched shapes, bad class ids.
    """
    image_id = row.get(schema.IMAGE_ID)
    if not isinstance(image_id, str) or not image_id:
        raise RowRejected("missing image id")
    check_image_id(image_id)  # later stages name files after it
    height, width = row.get(schema.HEIGHT), row.get(schema.WIDTH)
    if not isinstance(height, int) or not isinstance(width, int) or height < 1 or width < 1:
        raise RowRejected(f"bad image size {height}x{width}")
    if height * width > MAX_PIXELS:
        raise RowRejected(f"image over pixel limit: {height}x{width} > {MAX_PIXELS} pixels")
    labels = list(row.get(schema.LABELS) or [])
    if any(not isinstance(c, int) or not 1 <= c < num_classes for c in labels):
        raise RowRejected(f"label class ids {labels} outside [1, {num_classes})")
    if not isinstance(row.get(schema.IMAGE), bytes):
        raise RowRejected("missing image bytes")
    if not isinstance(row.get(schema.CAM), bytes):
        raise RowRejected("missing CAM bytes")
    cam_classes = [int(c) for c in row.get(schema.CAM_CLASSES) or []]
    try:
        cams = decode_cam_column(row[schema.CAM], len(cam_classes), height, width)
    except ValueError as exc:
        raise RowRejected(f"undecodable CAM: {exc}") from None
    image = decode_rgb(row[schema.IMAGE], height=height, width=width)
    gt = None
    if row.get(schema.GT) is not None:
        gt = decode_row_label_map(row[schema.GT], "ground truth", height, width)
        valid = gt[gt != schema.IGNORE_INDEX]
        if valid.size and int(valid.max()) >= num_classes:
            raise RowRejected(f"ground truth holds class ids outside [0, {num_classes})")
    seed_config = replace(config, num_classes=num_classes)
    try:
        argmax = cam_argmax(cams, cam_classes, bg_threshold=config.bg_threshold)
        start = time.perf_counter()
        seed = refine_seed(image, cams, cam_classes, config=seed_config)
        crf_seconds = time.perf_counter() - start
    except ValueError as exc:
        raise RowRejected(f"cannot refine: {exc}") from None
    columns = {
        schema.IMAGE_ID: image_id,
        schema.IMAGE: row[schema.IMAGE],
        schema.HEIGHT: height,
        schema.WIDTH: width,
        schema.LABELS: labels,
        schema.SEED: encode_label_png(seed),
        schema.GT: row.get(schema.GT),
        schema.SPLIT: row.get(schema.SPLIT),
    }
    return RefinedRow(columns, seed, argmax, gt, crf_seconds)


# ---------------------------------------------------------------------------------------------
# One unit (runs in a Ray task; also callable directly)


def unit_name(shard_path: str, row_group: int) -> str:
    stem = posixpath.basename(shard_path)
    stem = stem[: -len(".parquet")] if stem.endswith(".parquet") else stem
    return f"{stem}-rg{row_group:04d}"


def shard_rel(unit: str) -> str:
    return f"{SHARD_DIR}/{unit}.parquet"


def record_rel(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}.json"


def _read_row_group(input_loc: Location, unit: WorkUnit) -> pa.Table:
    path = input_loc.join(unit.path)
    try:
        with input_loc.fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            columns = [c for c in schema.INGEST_COLUMNS if c in names]
            return parquet.read_row_group(unit.row_group, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(input_loc, unit.path, exc, f" (row group {unit.row_group})") from None


def process_unit(
    unit: WorkUnit,
    *,
    input_loc: Location,
    output_loc: Location,
    config: SeedConfig,
    num_classes: int,
) -> dict[str, Any]:
    """Refines one row group and writes its shard, quarantine and completion record (last).

    Returns:
        The completion record: `unit`, `path`, `row_group`, `input_rows`, `output`,
        `quarantined`, `files` (FileEntry dicts), `reasons`, `confusion` ({split: {"images",
        "cam_argmax", "seeds"}}, K x (K + 1) matrices as lists), `crf_s`, `task_s`.
    """
    started = time.perf_counter()
    table = _read_row_group(input_loc, unit)
    rows: list[dict[str, Any]] = []
    quarantine = Quarantine(output_loc)
    reasons: Counter[str] = Counter()
    confusion: dict[str, dict[str, Any]] = {}
    crf_seconds = 0.0
    bad = 0
    for row in table.to_pylist():
        try:
            refined = refine_row(row, config=config, num_classes=num_classes)
        except RowRejected as exc:
            source = row.get(schema.SOURCE) or f"{unit.path}#rg{unit.row_group}"
            quarantine.add(str(row.get(schema.IMAGE_ID)), str(source), exc.reason)
            reasons[_reason_kind(exc.reason)] += 1
            bad += 1
            continue
        rows.append(refined.columns)
        crf_seconds += refined.crf_seconds
        if refined.gt is not None:
            split = refined.columns[schema.SPLIT] or NO_SPLIT
            acc = confusion.setdefault(
                split,
                {
                    "images": 0,
                    "cam_argmax": ConfusionAccumulator(num_classes),
                    "seeds": ConfusionAccumulator(num_classes),
                },
            )
            acc["images"] += 1
            acc["cam_argmax"].add(refined.argmax, refined.gt)
            acc["seeds"].add(refined.seed, refined.gt)
    files: list[dict[str, Any]] = []
    if rows:
        entry = write_parquet(
            output_loc, shard_rel(unit.name), pa.Table.from_pylist(rows, schema=REFINE_SCHEMA)
        )
        files.append(asdict(entry))
    q_entry = quarantine.flush(unit.name)
    if q_entry is not None:
        files.append(asdict(q_entry))
    record = {
        "unit": unit.name,
        "path": unit.path,
        "row_group": unit.row_group,
        "input_rows": table.num_rows,
        "output": len(rows),
        "quarantined": bad,
        "files": files,
        "reasons": dict(reasons),
        "confusion": {
            split: {
                "images": acc["images"],
                "cam_argmax": acc["cam_argmax"].matrix.tolist(),
                "seeds": acc["seeds"].matrix.tolist(),
            }
            for split, acc in confusion.items()
        },
        "crf_s": crf_seconds,
        "task_s": time.perf_counter() - started,
    }
    write_bytes_atomic(output_loc, record_rel(unit.name), json.dumps(record).encode())
    return record


def refine_units(
    batch: dict[str, np.ndarray],
    *,
    input_loc: Location,
    output_loc: Location,
    config: SeedConfig,
    num_classes: int,
) -> dict[str, np.ndarray]:
    """Ray Data batch wrapper of `process_unit`: column `unit` (JSON `WorkUnit`) in, `record`
    (JSON completion record) out, one row per unit."""
    records = []
    for unit_json in batch["unit"]:
        unit = WorkUnit(**json.loads(unit_json))
        record = process_unit(
            unit, input_loc=input_loc, output_loc=output_loc, config=config, num_classes=num_classes
        )
        records.append(json.dumps(record))
    return {"record": np.asarray(records, dtype=object)}


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


# ---------------------------------------------------------------------------------------------
# Driver


def enumerate_units(input_loc: Location, manifest: Manifest) -> list[WorkUnit]:
    """One unit per row group of every shard the ingest manifest lists (footers only).

    Raises:
        ValueError: a listed shard lacks an ingest column, or two shards share a file name.
    """
    shards = [f.path for f in manifest.entries(f"{SHARD_DIR}/") if f.path.endswith(".parquet")]

    def footer(path: str) -> list[WorkUnit]:
        try:
            with input_loc.fs.open(input_loc.join(path), "rb") as f:
                meta = pq.ParquetFile(f).metadata
                names = set(meta.schema.to_arrow_schema().names)
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(input_loc, path, exc) from None
        missing = [c for c in _REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path} is not an ingest shard: no column(s) {', '.join(missing)}")
        return [
            WorkUnit(unit_name(path, i), path, i, meta.row_group(i).num_rows)
            for i in range(meta.num_row_groups)
        ]

    with ThreadPoolExecutor(max_workers=min(_FOOTER_THREADS, max(1, len(shards)))) as pool:
        units = [u for found in pool.map(footer, shards) for u in found]
    names = Counter(u.name for u in units)
    repeated = [n for n, c in names.items() if c > 1]
    if repeated:
        raise ValueError(
            f"input shards share file names (units {repeated[:3]}): cannot name outputs"
        )
    for u in units:
        safe_relpath(shard_rel(u.name))
    return units


def _unreadable(input_loc: Location, path: str, exc: BaseException, where: str = "") -> Exception:
    """A one-line error naming the input shard that cannot be read (missing or corrupt)."""
    uri = input_loc.child(path).uri
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"input shard {uri} is listed in the input manifest but missing")
    detail = " ".join(str(exc).split())
    message = f"input shard {uri}{where} is unreadable: {type(exc).__name__}: {detail}"
    # An OSError stays one (it may be a storage failure that retries should see as such).
    return OSError(message) if isinstance(exc, OSError) else ValueError(message)


def read_records(output_loc: Location, units: Iterable[WorkUnit]) -> dict[str, dict[str, Any]]:
    """Completion records of units an earlier attempt finished (one batched read).

    A record that is torn or does not match its unit is ignored: the unit is redone.
    """
    wanted = {u.name: u for u in units}
    found = read_json_objects(output_loc, {name: record_rel(name) for name in wanted})
    records = {}
    for name, record in found.items():
        unit = wanted[name]
        if (
            record.get("unit") == name
            and record.get("path") == unit.path
            and record.get("row_group") == unit.row_group
            and record.get("input_rows") == unit.rows
        ):
            records[name] = record
    return records


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def build_metrics(
    records: Iterable[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    class_space: str,
    bg_threshold: float,
) -> dict[str, Any] | None:
    """Manifest metrics from the units' confusion matrices; None when no row has GT."""
    k = len(class_names)
    totals: dict[str, dict[str, Any]] = {}
    for record in records:
        for split, conf in record["confusion"].items():
            acc = totals.setdefault(
                split,
                {
                    "images": 0,
                    "cam_argmax": ConfusionAccumulator(k),
                    "seeds": ConfusionAccumulator(k),
                },
            )
            acc["images"] += conf["images"]
            for key in ("cam_argmax", "seeds"):
                acc[key].merge(np.asarray(conf[key], dtype=np.int64))
    if not totals:
        return None
    overall = {key: ConfusionAccumulator(k) for key in ("cam_argmax", "seeds")}
    for acc in totals.values():
        for key in overall:
            overall[key].merge(acc[key].matrix)
    scores = {key: acc.score() for key, acc in overall.items()}
    result: dict[str, Any] = {
        "class_space": class_space,
        "num_classes": k,
        "ground_truth": "every row with ground truth, all splits (per split under by_split)",
        "gt_images": sum(acc["images"] for acc in totals.values()),
        "cam_argmax_bg_threshold": bg_threshold,
    }
    for key, score in scores.items():
        entry = score.as_dict(list(class_names))
        entry["miou"] = _finite(entry["miou"])
        result[key] = entry
    result["miou"] = result["seeds"]["miou"]
    result["per_class_iou"] = result["seeds"]["per_class_iou"]
    result["by_split"] = {
        split: {
            "images": acc["images"],
            "cam_argmax": _finite(acc["cam_argmax"].score().miou),
            "seeds": _finite(acc["seeds"].score().miou),
        }
        for split, acc in sorted(totals.items())
    }
    return result


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
