"""The report of a pipeline run, `<output>/report/index.html`, and of one train, retrain or
evaluate stage run as a job, `<stage output>/report/index.html` (docs/CONTRACTS.md, report).

A run's report is built from its `summary.json`, its stage manifests and the stages' metrics
files only; a stage's from its manifest (and, for evaluate, its ground truth's: a refine output
gives the CAM and seed columns), with the sections that apply to it (`STAGE_SECTIONS`). Both read
(train `metrics.jsonl`, retrain `metrics.json`, evaluate `metrics.json` and `confusion.json`)
and the few rows they show: the images evaluate ranked (`pipelines.evaluate.ranking`, at most
8 worst, 8 best and 8 sampled, whatever the number of images), read from their own row groups.
Every file sits beside the page (plots and strips as PNG, no script, no network); every name
and id from the data is escaped. A section whose source is missing says so instead.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.io import schema
from pipelines.io.codecs import decode_label_map, decode_rgb, encode_label_png
from pipelines.io.manifest import Manifest, read_manifest
from pipelines.io.manifest_format import IncompleteOutputError, ManifestError
from pipelines.io.parquet import read_row_group
from pipelines.io.storage import Location, StorageOptions, read_bytes, redact, resolve
from pipelines.report import plots
from pipelines.report.strips import (
    INDEX_FILE,
    REPORT_DIR,
    ReportRow,
    page_head,
    render_row,
    row_file_name,
    swatch,
    write_file,
)

SUMMARY_ROWS = (
    ("CAM argmax", "cam_argmax"),
    ("CRF seeds", "crf_seeds"),
    ("pseudo masks", "pseudo_masks"),
    ("retrained model", "retrained"),
)
TRAIN_LOSSES = ("loss", "loss_seeding", "loss_boundary", "loss_auxiliary")
STRIP_LISTS = (
    ("worst", "Worst images (lowest per-image mIoU of the pseudo mask)"),
    ("best", "Best images"),
    ("sample", "A random sample"),
)
OVERLAY_ALPHA = 0.55  # opacity of the class colours over the image
CHANGE_EPSILON = 0.005  # IoU changes smaller than this are not highlighted
RUN_SECTIONS = ("summary", "per_class", "curves", "confusion", "strips", "run")
STAGE_SECTIONS = {  # what a stage's own report shows
    "train": ("curves", "run"),
    "retrain": ("summary", "per_class", "curves", "run"),
    "evaluate": ("summary", "per_class", "confusion", "strips", "run"),
}
esc = html.escape


def _pct(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{100 * value:.1f}"


def _read_json(loc: Location, rel: str) -> Any:
    return json.loads(read_bytes(loc, rel).decode("utf-8"))


def _metrics_history(loc: Location) -> list[dict[str, Any]]:
    """train's `metrics.jsonl`: one JSON object per logged iteration (bad lines skipped)."""
    history = []
    for line in read_bytes(loc, "metrics.jsonl").decode("utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            history.append(entry)
    return history


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are given as HTML (already escaped)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def summary_section(summary: Mapping[str, Any]) -> str:
    """The headline table: each mIoU the summary holds and where it was measured."""
    on = summary.get("measured_on") or {}
    rows = [
        [f"<td>{label}</td>", f'<td class="num">{_pct(summary.get(key))}</td>',
         f"<td>{esc(str(on.get(key, '')))}</td>"]
        for label, key in SUMMARY_ROWS if key in summary
    ]  # fmt: skip
    space = esc(str(summary.get("class_space")))
    return f"<h2>Summary ({space} classes)</h2>" + _table(["", "mIoU %", "measured on"], rows)


def per_class_columns(
    summary: Mapping[str, Any], manifests: Mapping[str, Manifest]
) -> list[tuple[str, Mapping[str, Any]]]:
    """(column title, {class name: IoU}) for CAM argmax, seeds, pseudo masks and retrained,
    each measured where the summary's row was (the CAM and seed columns on the summary's
    split when the refine metrics hold it, else over every image with ground truth)."""
    columns: list[tuple[str, Mapping[str, Any]]] = []
    on = summary.get("measured_on") or {}
    refine = (manifests["refine"].metrics or {}) if "refine" in manifests else {}
    split = summary.get("split")
    block = (refine.get("by_split") or {}).get(split) if split else None
    for title, key, summary_key in (("CAM argmax", "cam_argmax", "cam_argmax"),
                                    ("seeds", "seeds", "crf_seeds")):  # fmt: skip
        per_class = None
        where = on.get(summary_key, "")
        if isinstance(block, dict):
            per_class = (block.get("per_class_iou") or {}).get(key)
        if per_class is None:  # an older refine output: per class over every split only
            per_class = (refine.get(key) or {}).get("per_class_iou")
            where = f"every image with ground truth, {refine.get('gt_images')} images"
        if per_class:
            columns.append((f"{title} ({where})", per_class))
    for title, stage, key in (("pseudo masks", "evaluate", "pseudo_masks"),
                              ("retrained", "retrain", "retrained")):  # fmt: skip
        metrics = manifests[stage].metrics if stage in manifests else None
        per_class = (metrics or {}).get("per_class_iou")
        if per_class:
            columns.append((f"{title} ({on.get(key, '')})", per_class))
    return columns


def per_class_section(columns: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Per-class IoU across the columns, classes with a value somewhere only (COCO's unused ids
    are hidden), with the change from seeds to pseudo masks highlighted."""
    if not columns:
        return "<h2>Per-class IoU</h2><p>No per-class metrics in this run.</p>"
    titles = [title for title, _ in columns]
    names = [n for n in columns[0][1] if any(isinstance(c.get(n), int | float) for _, c in columns)]
    seeds = next((c for t, c in columns if t.startswith("seeds")), None)
    masks = next((c for t, c in columns if t.startswith("pseudo masks")), None)
    rows = []
    for name in names:
        cells = [f"<td>{esc(str(name))}</td>"]
        cells += [f'<td class="num">{_pct(c.get(name))}</td>' for _, c in columns]
        if seeds is not None and masks is not None:
            before, after = seeds.get(name), masks.get(name)
            if isinstance(before, int | float) and isinstance(after, int | float):
                change = after - before
                cls = (
                    "up" if change > CHANGE_EPSILON else "down" if change < -CHANGE_EPSILON else ""
                )
                cells.append(f'<td class="num {cls}">{100 * change:+.1f}</td>')
            else:
                cells.append("<td>-</td>")
        rows.append(cells)
    header = ["class", *(esc(t) for t in titles)]
    if seeds is not None and masks is not None:
        header.append("pseudo masks - seeds")
    note = f"<p>IoU in percent; {len(names)} classes with a value (others never occur).</p>"
    return "<h2>Per-class IoU</h2>" + note + _table(header, rows, "per-class")


def _figure(src: str, alt: str, caption: str = "", href: str | None = None) -> str:
    img = f'<img src="{esc(src, quote=True)}" alt="{esc(alt, quote=True)}">'
    if href:
        img = f'<a href="{esc(href, quote=True)}">{img}</a>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def curves_section(
    histories: Mapping[str, list[dict[str, Any]] | None], files: dict[str, bytes]
) -> str:
    """Training curves of WeakCLIP training and retraining (losses, lr, images/s)."""
    parts = [
        "<h2>Training curves</h2>",
        "<p>WeakCLIP training: total loss = seeding + boundary weight x boundary + auxiliary "
        "weight x auxiliary (loss, loss_seeding, loss_boundary, loss_auxiliary); retraining: "
        "the cross-entropy on the pseudo masks (loss). Learning rate and images/s beside.</p>",
    ]
    for stage, title, losses in (("train", "WeakCLIP training", TRAIN_LOSSES),
                                 ("retrain", "retraining", ("loss",))):  # fmt: skip
        if stage not in histories:
            continue
        history = histories[stage]
        if not history:
            parts.append(f"<p>{title}: no metrics history in this run.</p>")
            continue
        rel = f"curves-{stage}.png"
        files[rel] = plots.curves_png(history, losses=losses, title=title)
        parts.append(_figure(rel, f"{title} curves", f"{title}: {len(history)} logged points"))
    return "\n".join(parts)


def confusion_section(confusion: Mapping[str, Any] | None, files: dict[str, bytes]) -> str:
    """The pseudo masks' row-normalised confusion matrix (classes present only)."""
    head = "<h2>Confusion of the pseudo masks</h2>"
    if not confusion:
        return head + "<p>No confusion matrix in this run's evaluate output.</p>"
    matrix = np.asarray(confusion["matrix"], dtype=np.int64)
    names = list(confusion["class_names"])
    files["confusion.png"] = plots.confusion_png(matrix, names, title="pseudo masks vs GT")
    shown = len(plots.present_classes(matrix))
    text = f"rows: ground truth, columns: prediction; {shown} classes present, rows sum to 100"
    return head + _figure("confusion.png", "confusion matrix", esc(text))


def _legend(class_names: Sequence[str], maps: Sequence[np.ndarray | None]) -> str:
    ids = sorted(set().union(*(np.unique(m).tolist() for m in maps if m is not None)))
    items = [swatch(i, class_names[i]) for i in ids if i < len(class_names)]
    return " ".join(f"<span>{item}</span>" for item in items)


def strips_section(
    ranked: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    *,
    gt_loc: Location | None,
    pred_loc: Location | None,
    class_names: Sequence[str],
    files: dict[str, bytes],
) -> str:
    """Overlay strips (image | seed | pseudo mask | GT; class colours over the image,
    background clear) of the ranked images, each linking to its full-size pseudo mask, with its
    per-image mIoU and a legend of its classes."""
    parts = [
        "<h2>Images</h2>",
        "<p>Class colours over the image (background left clear); each strip links to its "
        "full-size pseudo mask.</p>",
    ]
    if not ranked or gt_loc is None or pred_loc is None:
        return parts[0] + "<p>No ranked images in this run's evaluate output.</p>"
    rows = _ranked_rows(gt_loc, [e for name, _ in STRIP_LISTS for e in ranked.get(name) or []])
    index = 0
    for name, heading in STRIP_LISTS:
        entries = ranked.get(name) or []
        parts.append(f"<h3>{esc(heading)} ({len(entries)})</h3>")
        for entry in entries:
            image_id = str(entry["image_id"])
            row = rows[image_id]
            rgb = decode_rgb(row[schema.IMAGE], height=row[schema.HEIGHT], width=row[schema.WIDTH])
            mask = decode_label_map(_prediction(pred_loc, entry["prediction"], image_id))
            seed = decode_label_map(row[schema.SEED]) if row.get(schema.SEED) else None
            truth = decode_label_map(row[schema.GT]) if row.get(schema.GT) else None
            miou = _pct(entry.get("miou"))
            strip = render_row(
                ReportRow(image_id=image_id, image=rgb, seed=seed, mask=mask, gt=truth),
                alpha=OVERLAY_ALPHA,
                titles=[t for t, m in (("seed", seed), (f"mask {miou}%", mask),
                                       ("ground truth", truth)) if m is not None],
            )  # fmt: skip
            rel = f"strips/{row_file_name(index, image_id)}"
            full = f"full/{row_file_name(index, image_id)}"
            files[rel] = strip
            files[full] = encode_label_png(mask)  # the mask itself, VOC palette
            index += 1
            caption = (
                f"{esc(image_id)} ({esc(str(entry.get('split')))}): pseudo-mask mIoU {miou}% "
                f"&middot; {_legend(class_names, [seed, mask, truth])}"
            )
            parts.append(_figure(rel, image_id, caption, href=full))
    return "\n".join(parts)


def _ranked_rows(gt_loc: Location, entries: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """image id -> its GT row (image, size, seed, GT), each row group read once, only the
    ranked rows kept."""
    wanted: dict[tuple[str, int], dict[int, str]] = {}
    for entry in entries:
        gt = entry["gt"]
        wanted.setdefault((str(gt["path"]), int(gt["row_group"])), {})[int(gt["row"])] = str(
            entry["image_id"]
        )
    columns = [schema.IMAGE_ID, schema.IMAGE, schema.HEIGHT, schema.WIDTH, schema.SEED, schema.GT]
    rows: dict[str, dict] = {}
    for (path, group), positions in wanted.items():
        table = read_row_group(gt_loc, path, group, columns)
        for position, image_id in positions.items():
            row = table.slice(position, 1).to_pylist() if 0 <= position < table.num_rows else []
            if not row or row[0][schema.IMAGE_ID] != image_id:
                raise RuntimeError(f"{path} row group {group} changed since evaluate ran")
            rows[image_id] = row[0]
    return rows


def _prediction(pred_loc: Location, where: Mapping[str, Any], image_id: str) -> bytes:
    """The label PNG of one prediction: a mask file, or the `seed` of its row in a shard."""
    path, group = str(where["path"]), int(where["row_group"])
    if group < 0:
        return read_bytes(pred_loc, path)
    table = read_row_group(pred_loc, path, group, [schema.IMAGE_ID, schema.SEED]).to_pydict()
    for found, seed in zip(table[schema.IMAGE_ID], table[schema.SEED], strict=True):
        if found == image_id:
            return seed
    raise RuntimeError(f"{path} row group {group} has no prediction for {image_id}")


def run_section(summary: Mapping[str, Any], manifests: Mapping[str, Manifest]) -> str:
    """Stage timings, code versions, checkpoint and CLIP digests, and each stage's config."""
    seconds = summary.get("seconds") or {}
    rows = []
    for stage, manifest in manifests.items():
        rows.append([
            f"<td>{esc(stage)}</td>", f'<td class="num">{esc(str(seconds.get(stage, "-")))}</td>',
            f"<td>{esc(manifest.code_version)}</td>", f"<td>{esc(manifest.created)}</td>",
            f"<td>{esc(str(manifest.run_id))}</td>",
        ])  # fmt: skip
    parts = ["<h2>The run</h2>"]
    if "total" in seconds:
        parts.append(f"<p>Wall time of the whole chain: {esc(str(seconds['total']))} s.</p>")
    parts.append(_table(["stage", "seconds", "code version", "written", "run id"], rows))
    masks = manifests.get("pseudo_masks")
    checkpoint = masks.extra.get("checkpoint") if masks is not None else None
    if isinstance(checkpoint, Mapping):
        parts.append(
            f"<p>Checkpoint: {esc(redact(str(checkpoint.get('uri'))))}, sha256 "
            f"<code>{esc(str(checkpoint.get('sha256')))}</code>, iteration "
            f"{esc(str(checkpoint.get('iteration')))} ({esc(str(checkpoint.get('layout')))})</p>"
        )
    train = manifests.get("train")
    clip = train.extra.get("clip_weights") if train is not None else None
    if isinstance(clip, Mapping):
        parts.append(f"<p>CLIP weights: <code>{esc(json.dumps(clip, sort_keys=True))}</code></p>")
    for stage, manifest in manifests.items():
        config = esc(json.dumps(manifest.config, indent=2, sort_keys=True, default=str))
        parts.append(
            f"<details><summary>{esc(stage)} config</summary><pre>{config}</pre></details>"
        )
    return "\n".join(parts)


def write_run_report(
    out: Location,
    summary: Mapping[str, Any],
    *,
    storage: StorageOptions | None = None,
    report: Callable[[str], Any] = print,
) -> str:
    """Writes `report/` below the run's output `out` from `summary` (the run's summary.json) and
    the stage outputs it names; returns the URI of its `index.html`."""
    manifests: dict[str, Manifest] = {}
    for stage, uri in (summary.get("stages") or {}).items():
        manifests[stage] = read_manifest(resolve(uri, storage))
    title = "WeakCLIP run report"
    return _write_page(out, title, summary, manifests, RUN_SECTIONS, storage, report)


def write_stage_report(
    loc: Location, *, storage: StorageOptions | None = None, report: Callable[[str], Any] = print
) -> str | None:
    """Writes `report/` below the committed train, retrain or evaluate output `loc` (the
    sections of `STAGE_SECTIONS`); returns the URI of its `index.html`, None for other stages.
    An evaluate output whose ground truth is a refine output also shows its CAM and seed mIoU."""
    manifest = read_manifest(loc)
    sections = STAGE_SECTIONS.get(manifest.stage)
    if sections is None:
        return None
    manifests = {manifest.stage: manifest}
    metrics = manifest.metrics or {}
    summary: dict[str, Any] = {"class_space": manifest.class_space, "measured_on": {}}
    if manifest.stage == "evaluate":
        gt_uri = (metrics.get("ground_truth") or {}).get("uri")
        gt = _manifest_or_none(str(gt_uri), storage, report) if gt_uri else None
        if gt is not None and gt.stage == "refine":
            manifests["refine"] = gt
            split = _one_split(metrics.get("prediction") or {}, storage)
            summary.update(refine_rows(gt.metrics or {}, split))
        summary["pseudo_masks"] = metrics.get("miou")
        measured = {**summary["measured_on"], "pseudo_masks": f"{metrics.get('images')} images"}
        summary["measured_on"] = measured
    elif manifest.stage == "retrain":
        summary["retrained"] = metrics.get("miou")
        images = metrics.get("num_val_images")
        summary["measured_on"]["retrained"] = f"val split (not trained on), {images} images"
    title = f"WeakCLIP {manifest.stage} report"
    return _write_page(loc, title, summary, manifests, sections, storage, report)


def refine_rows(metrics: Mapping[str, Any], split: str | None) -> dict[str, Any]:
    """The CAM argmax and seed rows of a summary from refine's `metrics`: on `split` when its
    block is there (`split` then kept), else over every image with ground truth (`split` None).
    """
    block = (metrics.get("by_split") or {}).get(split) if split else None
    if isinstance(block, Mapping):
        cam, seeds = block.get("cam_argmax"), block.get("seeds")
        where = f"{split} split, {block.get('images')} images"
    else:
        cam = (metrics.get("cam_argmax") or {}).get("miou")
        seeds = (metrics.get("seeds") or {}).get("miou")
        where, split = f"all splits, {metrics.get('gt_images')} images", None
    number = [float(v) if isinstance(v, int | float) else None for v in (cam, seeds)]
    return {
        "cam_argmax": number[0],
        "crf_seeds": number[1],
        "split": split,
        "measured_on": {"cam_argmax": where, "crf_seeds": where},
    }


def _one_split(prediction: Mapping[str, Any], storage: StorageOptions | None) -> str | None:
    """The one split a pseudo-mask prediction was made for (its config's `splits`), else None."""
    if prediction.get("stage") != "pseudo_masks" or not prediction.get("uri"):
        return None
    manifest = _manifest_or_none(str(prediction["uri"]), storage)
    splits = manifest.config.get("splits") if manifest is not None else None
    return str(splits[0]) if isinstance(splits, list) and len(splits) == 1 else None


def _manifest_or_none(
    uri: str, storage: StorageOptions | None, report: Callable[[str], Any] | None = None
) -> Manifest | None:
    """The manifest of an input a report names, or None (said to `report`) when it is gone or
    no longer complete: the columns it would give are then left out."""
    try:
        return read_manifest(resolve(uri, storage))
    except (FileNotFoundError, IncompleteOutputError, ManifestError) as exc:
        if report is not None:
            report(f"report: {redact(str(exc))}; the columns it gives are left out")
        return None


def _write_page(
    out: Location,
    title: str,
    summary: Mapping[str, Any],
    manifests: Mapping[str, Manifest],
    sections: Sequence[str],
    storage: StorageOptions | None,
    report: Callable[[str], Any],
) -> str:
    """Renders `sections` of the page (`RUN_SECTIONS` names them) and writes it with its files
    under `out/report/`; returns the URI of its `index.html`."""
    histories: dict[str, list[dict[str, Any]] | None] = {}
    if "train" in manifests:
        histories["train"] = _optional(
            lambda: _metrics_history(manifests["train"].location), report
        )
    if "retrain" in manifests:
        retrain = manifests["retrain"].location
        metrics_file = _optional(lambda: _read_json(retrain, "metrics.json"), report)
        histories["retrain"] = list((metrics_file or {}).get("history") or [])
    evaluated = manifests.get("evaluate")
    confusion = ranked = gt_loc = pred_loc = None
    if evaluated is not None:
        confusion = _optional(lambda: _read_json(evaluated.location, "confusion.json"), report)
        metrics = evaluated.metrics or {}
        ranked = metrics.get("images_ranked")
        if metrics.get("prediction") and metrics.get("ground_truth"):
            gt_loc = resolve(metrics["ground_truth"]["uri"], storage)
            pred_loc = resolve(metrics["prediction"]["uri"], storage)
    class_names = evaluated.class_names if evaluated is not None else ()
    files: dict[str, bytes] = {}
    render = {
        "summary": lambda: summary_section(summary),
        "per_class": lambda: per_class_section(per_class_columns(summary, manifests)),
        "curves": lambda: curves_section(histories, files),
        "confusion": lambda: confusion_section(confusion, files),
        "strips": lambda: strips_section(
            ranked, gt_loc=gt_loc, pred_loc=pred_loc, class_names=class_names, files=files
        ),
        "run": lambda: run_section(summary, manifests),
    }
    body = [render[name]() for name in sections]
    page = "\n".join([page_head(title), f"<h1>{esc(title)}</h1>", *body, "</body></html>\n"])
    for rel, data in files.items():
        write_file(out, f"{REPORT_DIR}/{rel}", data)
    write_file(out, f"{REPORT_DIR}/{INDEX_FILE}", page.encode())
    return out.child(REPORT_DIR, INDEX_FILE).uri


def _optional(read: Callable[[], Any], report: Callable[[str], Any]) -> Any:
    """`read()`, or None when the file is absent (an older stage output): the report then
    says the section's source is missing. Other errors propagate."""
    try:
        return read()
    except FileNotFoundError as exc:
        report(f"report: {redact(str(exc))} not found; its section is left out")
        return None
