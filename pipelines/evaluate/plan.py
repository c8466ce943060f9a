"""The join of the evaluate stage, planned on the driver from the id columns (and, for pseudo
masks, `mask`) of the listed shards only: one unit per ground-truth row group (`plan_units`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.evaluate.scoring import GT_STAGES, PRED_STAGES
from pipelines.io import schema
from pipelines.io.manifest import Manifest
from pipelines.io.parquet import read_shard
from pipelines.io.storage import safe_relpath
from pipelines.units import listed_shards, map_shards

MAX_MASK_BYTES = 64 * 1024 * 1024  # a listed mask PNG larger than this is quarantined


@dataclass(frozen=True)
class PredictionRef:
    """Where the prediction of one image is: a refine row group, or a mask PNG (row_group -1)."""

    path: str  # relative to the prediction output
    row_group: int


@dataclass
class JoinPlan:
    """What the driver learnt from the id columns: the tasks and the driver-side counts."""

    units: list[dict[str, Any]]
    predictions: int  # distinct prediction ids
    gt_rows: int
    prediction_without_gt: int
    quarantine: list[tuple[str, str, str]] = field(default_factory=list)  # id, source, reason


def _index_all(
    manifest: Manifest, columns: Sequence[str], required: Sequence[str]
) -> list[tuple[str, list[tuple[int, dict[str, list[Any]]]]]]:
    """The given (small) columns of every listed shard, per row group: [(shard, [(row group,
    columns)])].

    Raises:
        ValueError: no shard listed, or a shard lacks one of `columns` or `required`.
    """
    shards, loc = listed_shards(manifest), manifest.location
    if not shards:
        raise ValueError(f"{loc.uri} lists no shards/*.parquet")

    def index(rel: str) -> list[tuple[int, dict[str, list[Any]]]]:
        shard = read_shard(loc, rel, columns, required=(*columns, *required))
        if shard.missing:
            raise ValueError(f"{loc.uri}/{rel} has no column(s) {', '.join(shard.missing)}")
        return [(i, table.to_pydict()) for i, table in enumerate(shard.groups)]

    return list(zip(shards, map_shards(index, shards), strict=True))


def _check_stage(manifest: Manifest, stages: Sequence[str], comes_from: str) -> None:
    if manifest.stage not in stages:
        raise ValueError(
            f"{manifest.location.uri} is a {manifest.stage!r} output; {comes_from} "
            f"{' or '.join(stages)} outputs"
        )


def prediction_index(pred: Manifest) -> tuple[dict[str, PredictionRef], list[tuple[str, str, str]]]:
    """Every prediction id and where its label map is, plus quarantine rows (driver side).

    The first occurrence of an id wins; later duplicates, ids that are not non-empty strings,
    mask paths the manifest does not list and oversized masks are quarantined.
    """
    _check_stage(pred, PRED_STAGES, "predictions come from")
    masks = pred.stage == "pseudo_masks"
    columns = (schema.IMAGE_ID, schema.MASK) if masks else (schema.IMAGE_ID,)
    required = () if masks else (schema.SEED,)  # a seedless ingest output is refused here
    listed = {f.path: f.bytes for f in pred.files}
    refs: dict[str, PredictionRef] = {}
    quarantine: list[tuple[str, str, str]] = []
    for rel, groups in _index_all(pred, columns, required):
        for row_group, cols in groups:
            source = f"prediction {rel}#rg{row_group}"
            for n, image_id in enumerate(cols[schema.IMAGE_ID]):
                if not isinstance(image_id, str) or not image_id:
                    quarantine.append(("", source, "missing image id in the prediction"))
                    continue
                if image_id in refs:
                    quarantine.append((image_id, source, "duplicate image_id in the prediction"))
                    continue
                if not masks:
                    refs[image_id] = PredictionRef(rel, row_group)
                    continue
                mask = cols[schema.MASK][n]
                try:
                    mask_rel = safe_relpath(mask) if isinstance(mask, str) else None
                except ValueError:
                    mask_rel = None
                if mask_rel is None or mask_rel not in listed:
                    quarantine.append((image_id, source, "mask path not listed in the manifest"))
                elif listed[mask_rel] > MAX_MASK_BYTES:
                    quarantine.append((image_id, source, f"mask too large: {listed[mask_rel]} B"))
                else:
                    refs[image_id] = PredictionRef(mask_rel, -1)
    return refs, quarantine


def plan_units(
    gt_index: Sequence[tuple[str, Sequence[tuple[int, Sequence[Any]]]]],
    refs: dict[str, PredictionRef],
) -> JoinPlan:
    """One task per ground-truth row group of `gt_index` ([(GT shard, [(row group, image ids in
    row order)])]), with the predictions (`refs`) of its ids (pure).

    Returns:
        The plan; a unit is `{"gt_path", "gt_row_group", "predictions": [[position, id, path,
        row group]], "skip": [positions]}` where `skip` holds rows not to count (duplicate or
        missing ids, quarantined here).
    """
    seen: set[str] = set()
    units = []
    quarantine: list[tuple[str, str, str]] = []
    gt_rows = 0
    for rel, groups in gt_index:
        for row_group, ids in groups:
            predictions, skip = [], []
            for position, image_id in enumerate(ids):
                gt_rows += 1
                source = f"ground truth {rel}#rg{row_group}"
                if not isinstance(image_id, str) or not image_id:
                    quarantine.append(("", source, "missing image id in the ground truth"))
                    skip.append(position)
                elif image_id in seen:
                    quarantine.append((image_id, source, "duplicate image_id in the ground truth"))
                    skip.append(position)
                else:
                    seen.add(image_id)
                    ref = refs.get(image_id)
                    if ref is not None:
                        predictions.append([position, image_id, ref.path, ref.row_group])
            units.append(
                dict(gt_path=rel, gt_row_group=row_group, predictions=predictions, skip=skip)
            )
    without_gt = sum(1 for i in refs if i not in seen)
    return JoinPlan(units, len(refs), gt_rows, without_gt, quarantine)


def make_plan(pred: Manifest, gt: Manifest) -> JoinPlan:
    """Read the id columns of both outputs and plan the tasks (driver side, no label maps)."""
    _check_stage(gt, GT_STAGES, "ground truth comes from")
    refs, pred_quarantine = prediction_index(pred)
    found = _index_all(gt, (schema.IMAGE_ID,), (schema.GT,))
    gt_index = [
        (rel, [(rg, cols[schema.IMAGE_ID]) for rg, cols in groups]) for rel, groups in found
    ]
    plan = plan_units(gt_index, refs)
    plan.quarantine[:0] = pred_quarantine
    return plan
