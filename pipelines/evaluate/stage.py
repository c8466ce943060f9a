"""Driver of the evaluate stage (docs/METHOD.md, docs/CONTRACTS.md): the options, the class
space, the plan (`plan`), one Ray task per ground-truth row group or several
(`scoring.score_unit`), the sum of their confusion matrices and the output. Unmatched ids, null
GT and pairs that cannot be scored are counted and reported, never fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipelines.cli.options import (
    CLASSES_METAVAR,
    JobOptions,
    UsageError,
    add_max_error_fraction,
    comma_list,
    resolve_arg,
)
from pipelines.evaluate.plan import make_plan
from pipelines.evaluate.scoring import (
    EvaluationResult,
    RecordSum,
    format_table,
    label_conversion,
    manifest_space,
    score_unit,
    select_classes,
)
from pipelines.io.class_spaces import ClassSpace, class_space_from_arg
from pipelines.io.manifest import (
    FileEntry,
    Manifest,
    Quarantine,
    StageOutput,
    StageState,
    read_manifest,
)
from pipelines.io.storage import StorageOptions, read_bytes, resolve, write_bytes_atomic
from pipelines.units import already_done, error_gate, run_tasks
from weakclip.config import check_fields

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion.json"
TARGET_TASKS = 512  # about this many tasks at most; bigger inputs give a task several units
MAX_CLASSES_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of the evaluate stage (CLI flags and `--config` fields)."""

    classes: str | None = None  # voc|coco91|coco81|classes.txt URI: space to score in
    average_over: tuple[str, ...] | None = None  # class names or ids mIoU averages (None: all)
    max_error_fraction: float = 0.01  # above this share of quarantined pairs the job fails

    def __post_init__(self) -> None:
        check_fields(self, "in [0, 1]", "max_error_fraction")
        if self.classes is not None and not self.classes.strip():
            raise ValueError("classes: must not be empty")
        if self.average_over is not None:
            if not self.average_over:
                raise ValueError("average_over: name at least one class")
            if not all(isinstance(c, str) and c.strip() for c in self.average_over):
                raise ValueError("average_over: class names or ids, as non-empty strings")


def add_options(parser: argparse.ArgumentParser, stage: argparse._ArgumentGroup) -> None:
    """The job's own options (`jobs.evaluate`); its `--output` is optional."""
    for action in parser._actions:
        if action.dest == "output":
            action.required = False
            action.help = "optional: also write an evaluate stage directory here"
        elif action.dest == "input":
            action.help = "refine or pseudo_masks output holding the label maps to score"
    add = stage.add_argument
    add("--gt", required=True, metavar="URI", help="ingest or refine output holding `gt`")
    classes = "class space to score in (default: the manifests'); converts coco91 <-> coco81"
    add("--classes", metavar=CLASSES_METAVAR, help=classes)
    average = "comma-separated class names or ids the mIoU averages over (default: all)"
    add("--average-over", metavar="NAMES", help=average)
    add("--json", action="store_true", help="print the metrics as JSON")
    add_max_error_fraction(stage)


def config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the flags set (None: not given)."""
    names = args.average_over
    fields = {"classes": args.classes, "average_over": comma_list(names) if names else None}
    return {**fields, "max_error_fraction": args.max_error_fraction}


def check_inputs(
    options: JobOptions, gt: str, config: EvaluateConfig
) -> tuple[str, str, str | None]:
    """The URIs of prediction, ground truth and output (if any), once both inputs are complete
    and `classes` readable (before Ray starts).

    Raises:
        UsageError: an unusable `--gt` or `--classes`.
        IncompleteOutputError: an input without `_SUCCESS`.
    """
    gt_loc = resolve_arg("--gt", gt, options.storage)
    if config.classes is not None:
        try:
            requested_space(config.classes, options.storage)
        except (OSError, ValueError) as e:
            raise UsageError(f"--classes: {e}") from None
    assert options.input is not None
    read_manifest(options.input)
    read_manifest(gt_loc)
    return options.input.uri, gt_loc.uri, options.output.uri if options.output else None


class TooManyErrors(RuntimeError):
    """More than `max_error_fraction` of the pairs were quarantined: nothing committed."""

    def __init__(self, message: str, metrics: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.metrics = dict(metrics)


def stage_config(config: EvaluateConfig) -> dict[str, Any]:
    """What fingerprints an evaluate output: every field but the error tolerance (a run that
    failed the gate can be resumed with a higher one)."""
    return {k: v for k, v in asdict(config).items() if k != "max_error_fraction"}


def print_metrics(metrics: Mapping[str, Any], *, as_json: bool) -> int:
    """Prints the table (or the metrics as JSON) on stdout; the job's exit status."""
    print(json.dumps(metrics, indent=2, allow_nan=False) if as_json else format_table(metrics))
    if metrics.get("images"):
        return 0
    error = "error: no image had both a prediction and ground truth (see the counts above)"
    print(error, file=sys.stderr)
    return 1


def resolve_class_space(
    pred: Manifest, gt: Manifest, classes: str | None, *, storage: StorageOptions | None = None
) -> tuple[ClassSpace, str | None, str | None]:
    """The space to score in (`classes`, else the GT's, else the prediction's), and the label
    conversions (`label_conversion`) of prediction and GT into it.

    Raises:
        ValueError: no space anywhere, or spaces that cannot be converted into each other.
    """
    requested = requested_space(classes, storage) if classes else None
    pred_space, gt_space = manifest_space(pred), manifest_space(gt)
    target = requested or gt_space or pred_space
    if target is None:
        raise ValueError(
            "neither manifest names its classes: pass --classes voc|coco91|coco81|FILE"
        )
    return (
        target,
        label_conversion(pred_space, target, f"the prediction {pred.location.uri}"),
        label_conversion(gt_space, target, f"the ground truth {gt.location.uri}"),
    )


def requested_space(classes: str, storage: StorageOptions | None = None) -> ClassSpace:
    """`--classes`: voc, coco91, coco81, or the URI of a classes.txt (background first).

    Raises:
        ValueError, OSError: an unknown name, or an unreadable or malformed file.
    """
    if classes.strip().lower() in ("voc", "coco91", "coco81"):
        return class_space_from_arg(classes)
    data = read_bytes(resolve(classes, storage), max_bytes=MAX_CLASSES_FILE_BYTES)
    return class_space_from_arg(data.decode("utf-8").splitlines())


def score_units(
    batch: dict[str, np.ndarray], *, num_classes: int, **kwargs: Any
) -> dict[str, np.ndarray]:
    """Ray Data batch wrapper of `score_unit`: JSON units in column `unit`, their sum out as
    one JSON `record` (one matrix per task)."""
    total = RecordSum(num_classes)
    for unit_json in batch["unit"]:
        total.add(score_unit(json.loads(unit_json), num_classes=num_classes, **kwargs))
    return {"record": np.asarray([json.dumps(total.record())], dtype=object)}


def evaluate_outputs(
    pred: Manifest,
    gt: Manifest,
    config: EvaluateConfig,
    *,
    storage: StorageOptions | None,
    num_cpus_per_task: float,
    report: Callable[[str], Any],
) -> EvaluationResult:
    """Scores `pred` against `gt` on the current Ray instance."""
    started = time.monotonic()
    space, pred_conversion, gt_conversion = resolve_class_space(
        pred, gt, config.classes, storage=storage
    )
    average_ids = select_classes(space, config.average_over)
    plan = make_plan(pred, gt)
    conversions = {"prediction": pred_conversion, "ground_truth": gt_conversion}
    report(
        f"evaluate: {plan.predictions} predictions ({pred.stage}) against {plan.gt_rows} rows "
        f"({gt.stage}), {len(plan.units)} GT row groups; class space {space.name} "
        f"({space.num_classes} classes)"
        + "".join(
            f"; {who} converted {conv}"
            for who, conv in (("prediction", pred_conversion), ("GT", gt_conversion))
            if conv
        )
    )
    total = RecordSum(space.num_classes)
    fn_kwargs = dict(gt_loc=gt.location, pred_loc=pred.location, num_classes=space.num_classes)
    tasks = run_tasks(
        plan.units,
        score_units,
        num_cpus=num_cpus_per_task,
        fn_kwargs=fn_kwargs | dict(pred_conversion=pred_conversion, gt_conversion=gt_conversion),
        batch_size=max(1, math.ceil(len(plan.units) / TARGET_TASKS)),
    )
    for record in tasks:
        total.add(record)
    quarantine = [*plan.quarantine, *(tuple(q) for q in total.quarantine)]
    counts = {
        "predictions": plan.predictions,
        "gt_rows": plan.gt_rows,
        "scored": total.scored,
        "prediction_without_gt": plan.prediction_without_gt,
        "gt_null": total.gt_null,
        "gt_without_prediction": sum(total.gt_without_prediction.values()),
        "quarantined": len(quarantine),
    }
    result = EvaluationResult(
        prediction={"uri": pred.location.uri, "stage": pred.stage},
        ground_truth={"uri": gt.location.uri, "stage": gt.stage},
        space=space,
        average_over=average_ids,
        total=total,
        counts=counts,
        quarantine=tuple(quarantine),
        conversions=conversions,
        seconds=time.monotonic() - started,
    )
    miou = result.miou
    report(
        f"evaluate: {total.scored} images scored, mIoU "
        f"{'n/a' if miou is None else f'{100 * miou:.2f}'} ({result.seconds:.0f} s)"
    )
    return result


def write_evaluation(out: StageOutput, result: EvaluationResult) -> Manifest:
    """`metrics.json`, `confusion.json`, `quarantine/evaluate.parquet` (when any), manifest,
    `_SUCCESS` last."""
    metrics = result.metrics()
    data = json.dumps(metrics, indent=2, allow_nan=False).encode()
    write_bytes_atomic(out.location, METRICS_FILE, data)
    confusion = json.dumps(result.confusion_file()).encode()
    write_bytes_atomic(out.location, CONFUSION_FILE, confusion)
    quarantine = Quarantine(out.location)
    for row in result.quarantine:
        quarantine.add(*row)
    quarantine.flush("evaluate")
    counts = dict(result.counts)
    counts |= {"input": counts["predictions"], "output": counts["scored"]}
    return out.commit(
        files=[
            FileEntry(path=METRICS_FILE, rows=None, bytes=len(data)),
            FileEntry(path=CONFUSION_FILE, rows=None, bytes=len(confusion)),
            *quarantine.files,
        ],
        counts={**counts, "quarantined": quarantine.count},
        class_names=result.space.class_names,
        class_space=result.space.name,
        metrics=metrics,
    )


def run_evaluate(
    pred_uri: str,
    gt_uri: str,
    output_uri: str | None,
    config: EvaluateConfig,
    *,
    storage: StorageOptions | None = None,
    num_cpus_per_task: float = 0.5,
    overwrite: bool = False,
    report: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Scores a refine or pseudo_masks output (`pred_uri`) against the GT of an ingest or
    refine output (`gt_uri`) on the current Ray instance, writes the stage output at
    `output_uri` when given (not when no image could be scored) and returns the metrics (the
    stored ones of an output already complete with the same config and inputs).

    Args:
        num_cpus_per_task: CPUs reserved per scoring task.
        report: progress sink, one line per call.

    Raises:
        IncompleteOutputError: an input has no `_SUCCESS`.
        ValueError: wrong stages, missing columns, or incompatible class spaces.
        StageConflictError: the output holds another run (and not `overwrite`).
        TooManyErrors: the error gate (`units.error_gate`) failed; nothing written.
    """
    pred = read_manifest(resolve(pred_uri, storage))
    gt = read_manifest(resolve(gt_uri, storage))
    out = None
    if output_uri is not None:
        out = StageOutput.open(
            resolve(output_uri, storage),
            stage="evaluate",
            config=stage_config(config),
            inputs=[pred.input_ref(), gt.input_ref()],
            overwrite=overwrite,
        )
        if out.state is StageState.DONE:
            return dict(already_done(out, report)["metrics"] or {})
    result = evaluate_outputs(
        pred, gt, config, storage=storage, num_cpus_per_task=num_cpus_per_task, report=report
    )
    bad, scored = result.counts["quarantined"], result.counts["scored"]
    refused = error_gate(bad, bad + scored, config.max_error_fraction, what="pairs")
    if refused:
        message = f"evaluate: {refused}; see quarantine_reasons in the metrics; nothing committed"
        raise TooManyErrors(message, result.metrics())
    if out is not None and result.counts["scored"]:  # an evaluation of nothing is a failure
        write_evaluation(out, result)
        report(f"evaluate: wrote {out.location.uri}")
    return result.metrics()
