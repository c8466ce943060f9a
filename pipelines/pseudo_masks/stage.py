"""Driver of the pseudo-mask stage (docs/METHOD.md): ingest or refine output + `model.pt` →
`masks/<image_id>.png`, the index `shards/<unit>.parquet`, `quarantine/`, `report/`,
`manifest.json` and `_SUCCESS` last.

One Ray Data pipeline streams three operators: CPU tasks that read and validate a unit and score
the baseline (`rows.read_unit`), a pool of 1 to `actor_pool_size` model replicas
(`infer.MaskPredictor`, one GPU each when the cluster has GPUs) and CPU tasks for the CRF that
write the masks (`rows.postprocess_rows`). Only small JSON rows come back; the driver writes
each unit once all its rows are back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from itertools import zip_longest
from typing import Any

from pipelines import units as core
from pipelines.cli.ray_init import use_gpu
from pipelines.io.manifest import FileEntry, Manifest, StageOutput, StageState, read_manifest
from pipelines.io.storage import Location, StorageOptions, resolve
from pipelines.metrics import add_sparse, summed_metrics
from pipelines.progress import Progress
from pipelines.pseudo_masks.checkpoint import VerifiedCheckpoint, verify_checkpoint
from pipelines.pseudo_masks.config import PseudoMaskConfig, stage_config
from pipelines.pseudo_masks.report import build_report_rows
from pipelines.pseudo_masks.rows import PseudoUnit, RowSpec
from pipelines.pseudo_masks.units import enumerate_units, finish_unit
from pipelines.report.strips import sample_ids, write_report
from weakclip.config import InferenceConfig

STAGE = "pseudo_masks"


@dataclass(frozen=True)
class PseudoMaskResult(core.StageResult):
    """`StageResult` with the timings of this call."""

    pipeline_seconds: float = 0.0  # wall time of the Ray Data pipeline (0 when nothing ran)
    infer_seconds: float = 0.0  # Σ model time per image in the actors
    crf_seconds: float = 0.0  # Σ CRF + mask time per image in the CRF tasks
    images_run: int = 0  # rows sent through the pipeline
    actor_memory_mb: dict[str, float] | None = None  # actor → peak RSS (MB; + CUDA on GPU)


def check_class_names(source: Manifest, checkpoint: VerifiedCheckpoint) -> None:
    """Refuses a checkpoint trained on another class space than the input's.

    Raises:
        ValueError: the class names differ (count, order or spelling).
    """
    ours, theirs = checkpoint.class_names, tuple(source.class_names)
    if ours == theirs:
        return
    pairs = list(zip_longest(ours, theirs))
    first = next(i for i, (a, b) in enumerate(pairs) if a != b)
    ours_first, theirs_first = ("-" if n is None else n for n in pairs[first])
    raise ValueError(
        f"class names differ: the checkpoint has {len(ours)} classes, the input "
        f"({source.class_space}) {len(theirs)}; first difference at class id {first} "
        f"({ours_first!r} vs {theirs_first!r}): use a model trained on this class space"
    )


def run_pseudo_masks(
    input_uri: str,
    output_uri: str,
    checkpoint: str | VerifiedCheckpoint,
    config: PseudoMaskConfig,
    *,
    actor_pool_size: int = 1,
    storage: StorageOptions | None = None,
    cpus_per_actor: float = 1.0,
    num_cpus_per_task: float = 0.5,
    batch_size: int | None = None,
    use_gpu: bool | None = None,
    overwrite: bool = False,
    progress_every: int | None = None,
    report: Callable[[str], Any] = print,
) -> PseudoMaskResult:
    """Runs the pseudo-mask stage on the current Ray instance (see the module docstring).

    Args:
        checkpoint: train's `model.pt` (URI, or one already verified).
        actor_pool_size, cpus_per_actor: the most model replicas (the pool starts with one,
            grows while input waits and shrinks when a node is lost, so that it never holds
            every CPU the read and CRF tasks need) and CPUs (torch threads) of each; on 2
            cores 1 CPU leaves room for the read and CRF tasks.
        num_cpus_per_task: CPUs per CRF task (read tasks take half of it).
        batch_size: images per model call; None = 8 on GPU, 2 on CPU.
        use_gpu: one GPU per replica; None = when the cluster has GPUs.
        overwrite: replace an output made with another checkpoint, config or input.
        progress_every: a progress line (to `report`) every this many images (default: one
            every 10 s, `pipelines.progress`).

    Raises:
        CheckpointRefused: the checkpoint is unsafe, unreadable or not an export (before Ray).
        IncompleteOutputError: the input has no `_SUCCESS`.
        ValueError: not an ingest/refine input, other class names, or no row in the splits.
        StageConflictError: the output holds another run (and not `overwrite`).
    """
    started = time.monotonic()
    input_loc, output_loc = resolve(input_uri, storage), resolve(output_uri, storage)
    source = read_manifest(input_loc, stages=("ingest", "refine"))
    if not isinstance(checkpoint, VerifiedCheckpoint):
        checkpoint = verify_checkpoint(checkpoint, storage)
    check_class_names(source, checkpoint)
    inference = config.inference(checkpoint.config.inference, source.class_space)
    out = StageOutput.open(
        output_loc,
        stage=STAGE,
        config=stage_config(config, inference, checkpoint),
        inputs=[source.input_ref()],
        overwrite=overwrite,
    )
    if out.state is StageState.DONE:
        return PseudoMaskResult(
            **core.already_done(out, report), seconds=time.monotonic() - started
        )
    run = _Run(config, inference, checkpoint, source, input_loc, output_loc, report)
    units = enumerate_units(input_loc, source, splits=config.splits)
    records = core.resume(out, {u.name: u for u in units}, core.record_matches)
    report(run.start_line(units, records))
    pool = _Pool(actor_pool_size, cpus_per_actor, num_cpus_per_task, batch_size, use_gpu)
    todo = [u for u in units if u.name not in records]
    timing = _run_units(run, todo, records, pool, progress_every)
    return _gate_and_commit(run, out, units, records, timing, started)


@dataclass(frozen=True)
class _Run:
    """What every step of one run reads: options, model, input and output."""

    config: PseudoMaskConfig
    inference: InferenceConfig
    checkpoint: VerifiedCheckpoint
    source: Manifest
    input_loc: Location
    output_loc: Location
    report: Callable[[str], Any]

    @property
    def spec(self) -> RowSpec:
        return RowSpec(
            num_classes=len(self.source.class_names),
            input_stage=self.source.stage,
            splits=self.config.splits,
            cam_bg_threshold=self.config.cam_bg_threshold,
        )

    def finish(self, unit: PseudoUnit, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """`finish_unit` of a unit whose rows are all back (its record)."""
        return finish_unit(unit, rows, self.output_loc, self.checkpoint.sha256, self.spec)

    def start_line(self, units: Sequence[PseudoUnit], records: Mapping[str, Any]) -> str:
        config, inference = self.config, self.inference
        classes = "restricted to image" if inference.restrict_to_image_classes else "all"
        return (
            f"pseudo_masks: {sum(u.selected for u in units)} of {sum(u.rows for u in units)} "
            f"rows in split(s) {'all' if config.splits is None else ','.join(config.splits)} "
            f"from {self.input_loc.uri}; {len(inference.scales)} scale(s)"
            f"{' x flip' if inference.flip else ''}, "
            f"{classes} classes, CRF {'on' if config.use_crf else 'off'}; "
            f"checkpoint {self.checkpoint.sha256[:12]}"
            + (f"; resuming: {len(records)} of {len(units)} units already done" if records else "")
        )


def _gate_and_commit(
    run: _Run,
    out: StageOutput,
    units: Sequence[PseudoUnit],
    records: Mapping[str, dict[str, Any]],
    run_timing: Mapping[str, Any],
    started: float,
) -> PseudoMaskResult:
    """Sums the units' records, applies the error gate, writes the report and commits."""
    ordered = [records[u.name] for u in units]
    total_rows, selected = sum(u.rows for u in units), sum(u.selected for u in units)
    source, config, baseline = run.source, run.config, run.spec.baseline
    metrics = summed_metrics(
        ordered,
        ("pseudo_masks", baseline),
        source.class_names,
        add_sparse,
        headline="pseudo_masks",
        class_space=source.class_space,
        ground_truth="every processed row with ground truth (per split under by_split)",
        extra={"cam_argmax_bg_threshold": config.cam_bg_threshold}
        if baseline == "cam_argmax"
        else None,
    )

    def written() -> tuple[list[FileEntry], dict[str, Any]]:
        files = _write_report(run, ordered, metrics) if config.report_images else []
        ckpt = run.checkpoint
        checkpoint = {key: getattr(ckpt, key) for key in ("uri", "sha256", "iteration", "layout")}
        return files, {"checkpoint": checkpoint, "report": [f.path for f in files]}

    tally = core.tally_records(ordered)
    skipped = total_rows - selected
    return core.gate_and_commit(
        STAGE,
        out,
        tally,
        {"input": total_rows, "selected": selected, "skipped": skipped},
        max_error_fraction=config.max_error_fraction,
        started=started,
        result=partial(PseudoMaskResult, **run_timing),
        summary=(f"{tally.output} masks", f", {skipped} rows of other splits skipped"),
        report=run.report,
        class_names=source.class_names,
        class_space=source.class_space,
        metrics=metrics,
        scores={baseline: baseline.replace("_", " "), "pseudo_masks": "pseudo masks"},
        rows="selected",
        units=len(units),
        written=written,
    )


def _write_report(
    run: _Run, records: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any] | None
) -> list[FileEntry]:
    """Writes `report/` for `report_images` images sampled from the units' records; returns
    its files for the manifest."""
    where = {i: (r["path"], r["row_group"], n) for r in records for i, n in r["images"]}
    shown: dict[str, Any] | None = None
    if metrics is not None:
        shown = {
            f"mIoU {key.replace('_', ' ')}": metrics[key]["miou"]
            for key in ("cam_argmax", "seeds", "pseudo_masks")
            if key in metrics
        }
        shown["images with ground truth"] = metrics["gt_images"]
    rows = build_report_rows(
        {i: where[i] for i in sample_ids(sorted(where), run.config.report_images)},
        input_loc=run.input_loc,
        source=run.source,
        output_loc=run.output_loc,
        bg_threshold=run.config.cam_bg_threshold,
        report=run.report,
    )
    space, sha256 = run.source.class_space, run.checkpoint.sha256
    title = f"Pseudo masks ({space}), checkpoint {sha256[:12]}"
    return write_report(
        run.output_loc, rows, class_names=run.source.class_names, title=title, metrics=shown
    )


@dataclass(frozen=True)
class _Pool:
    """How the pipeline is spread over the cluster (see `run_pseudo_masks`' arguments)."""

    actor_pool_size: int
    cpus_per_actor: float
    num_cpus_per_task: float
    batch_size: int | None
    use_gpu: bool | None


def _run_units(
    run: _Run,
    todo: Sequence[PseudoUnit],
    records: dict[str, dict[str, Any]],
    pool: _Pool,
    progress_every: int | None,
) -> dict[str, Any]:
    """Streams the units without a record through the three operators; fills `records`."""
    timing: dict[str, Any] = dict(infer_seconds=0.0, crf_seconds=0.0)
    for unit in (u for u in todo if u.selected == 0):  # every row in other splits
        records[unit.name] = run.finish(unit, [])
    work = {u.name: u for u in todo if u.selected > 0}
    if not work:
        return {}
    total = sum(u.selected for u in work.values())
    progress = Progress("pseudo_masks", total, report=run.report, every_items=progress_every)
    pending: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in work}
    memory: dict[str, float] = {}
    writes: list[Future[dict[str, Any]]] = []
    done, run_started = 0, time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as threads:
        for row in _dataset(run, list(work.values()), pool).iter_rows():
            meta = json.loads(row["meta"])
            rows = pending.get(meta["unit"])
            if rows is None or int(meta["row"]) in rows:
                continue  # a row of a retried batch that already came back
            rows[int(meta["row"])] = meta
            done += 1
            timing["infer_seconds"] += meta.get("infer_s", 0.0)
            timing["crf_seconds"] += meta.get("crf_s", 0.0)
            if actor := meta.get("actor"):
                peak = actor["rss_mb"] + actor.get("cuda_mb", 0.0)
                memory[actor["id"]] = max(memory.get(actor["id"], 0.0), peak)
            if len(rows) == work[meta["unit"]].selected:
                back = list(pending.pop(meta["unit"]).values())
                writes.append(threads.submit(run.finish, work[meta["unit"]], back))
            _collect_finished(writes, records)  # a failed write stops the stage now
            progress.update(done)
        for future in writes:
            record = future.result()
            records[record["unit"]] = record
    if pending:
        raise RuntimeError(f"{len(pending)} unit(s) did not return all their rows")
    timing.update(
        pipeline_seconds=time.monotonic() - run_started, images_run=done, actor_memory_mb=memory
    )
    return timing


def _collect_finished(
    writes: list[Future[dict[str, Any]]], records: dict[str, dict[str, Any]]
) -> None:
    """Moves the finished unit writes' records into `records`; a write that failed (its
    storage retries spent) raises here, while inference is still running, not at the end."""
    for future in [f for f in writes if f.done()]:
        writes.remove(future)
        record = future.result()
        records[record["unit"]] = record


def _dataset(run: _Run, work: Sequence[PseudoUnit], pool: _Pool) -> Any:
    """The Ray Data pipeline over `work`: read and validate, the model actors, the CRF."""
    import ray

    from pipelines.pseudo_masks.infer import MaskPredictor
    from pipelines.pseudo_masks.rows import postprocess_rows, read_unit

    gpu, ckpt = use_gpu(pool.use_gpu), run.checkpoint
    items = [{"unit": json.dumps(asdict(u))} for u in work]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_unit,
            batch_size=1,
            num_cpus=pool.num_cpus_per_task / 2,
            fn_kwargs={"input_loc": run.input_loc, "spec": run.spec},
        )
        .map_batches(
            MaskPredictor,
            batch_size=pool.batch_size or (8 if gpu else 2),
            # min 1: a pool that lost its node shrinks instead of holding every CPU left
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.actor_pool_size),
            num_cpus=pool.cpus_per_actor,
            num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={
                "checkpoint": [ray.put(ckpt.data)],
                "sha256": ckpt.sha256,
                "inference": run.inference,
                "use_gpu": gpu,
                "threads": max(1, int(pool.cpus_per_actor)),
                "released_config": ckpt.config if ckpt.layout == "released" else None,
            },
        )
        .map_batches(
            postprocess_rows,
            batch_size=1,
            num_cpus=pool.num_cpus_per_task,
            fn_kwargs={
                "output_loc": run.output_loc,
                "crf": run.inference.crf if run.config.use_crf else None,
                "num_classes": run.spec.num_classes,
            },
        )
    )
