"""Ingest stage: raw WSSS inputs in object storage → canonical Parquet shards + quarantine.

Reads the MCTformer/WeakTr layout (`JPEGImages/<id>.jpg`, `cams/<id>.npy`, `cls_labels.npy`,
optional `SegmentationClassAug/<id>.png`, optional split lists and `classes.txt`) or the CLIP-ES
CAM layout, from a local directory or `s3://`.

How the work is cut: the driver enumerates image ids (from split lists when given, so millions of
keys are never listed; else one listing per folder), rejects what it can see from names alone
(unsafe ids, duplicates, ids without a label), then cuts the sorted ids into fixed chunks. Ray
Data runs one task per chunk: it fetches the chunk's files concurrently, validates every row
(`pipelines.ingest_rows`) and writes `shards/part-<chunk>.parquet` and, for bad rows,
`quarantine/part-<chunk>.parquet`, then a small completion record `_chunks/part-<chunk>.json`.
File names depend only on the chunk, so a resumed run redoes only chunks without a record and
no row can appear twice. The driver commits `manifest.json` and `_SUCCESS` last.

Writes the ingest columns of `pipelines.io.schema.INGEST_COLUMNS`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest_rows import LAYOUTS, RowLimits, build_row
from pipelines.io import schema
from pipelines.io.class_spaces import ClassSpace, class_space_from_arg
from pipelines.io.codecs import MAX_PIXELS
from pipelines.io.manifest import (
    FileEntry,
    InputRef,
    Quarantine,
    StageOutput,
    StageState,
)
from pipelines.io.rows import RowRejected, check_image_id
from pipelines.io.safe_pickle import CamDecodeError, load_cls_labels
from pipelines.io.storage import Location, StorageOptions, open_atomic, resolve, write_bytes_atomic

SHARD_SCHEMA = pa.schema(
    [
        (schema.IMAGE_ID, pa.string()),
        (schema.IMAGE, pa.binary()),
        (schema.HEIGHT, pa.int32()),
        (schema.WIDTH, pa.int32()),
        (schema.LABELS, pa.list_(pa.int16())),
        (schema.CAM, pa.large_binary()),
        (schema.CAM_CLASSES, pa.list_(pa.int16())),
        (schema.GT, pa.binary()),
        (schema.SOURCE, pa.string()),
        (schema.SPLIT, pa.string()),
    ]
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_FETCH_GROUP = 16  # rows fetched concurrently and written as one Parquet row group
CHUNK_DIR = "_chunks"  # completion records of finished chunks (bookkeeping, not data files)


@dataclass(frozen=True)
class IngestConfig:
    """Options of the ingest stage (CLI flags and `--config` fields)."""

    layout: str = "mctformer"  # CAM file layout: "mctformer" (dict per class) or "clip-es"
    classes: str | None = None  # voc | coco91 | coco81 | URI of a classes.txt; None: input's
    splits: tuple[str, ...] = ()  # "NAME=URI" or "URI" (name = file stem); relative to --input
    max_error_fraction: float = 0.01  # above this share of quarantined rows the job fails
    max_pixels: int = MAX_PIXELS  # larger images are quarantined before decoding
    rows_per_shard: int = 256  # rows per output shard (≈ a few hundred MB at VOC size)
    image_dir: str = "JPEGImages"  # folders and files of the input layout
    cam_dir: str = "cams"
    gt_dir: str = "SegmentationClassAug"
    labels_file: str = "cls_labels.npy"
    image_suffix: str = ".jpg"  # used with split lists, where nothing is listed

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError("max_error_fraction: must be in [0, 1]")
        if self.max_pixels <= 0:
            raise ValueError("max_pixels: must be positive")
        if not 1 <= self.rows_per_shard <= 100_000:
            raise ValueError("rows_per_shard: must be in [1, 100000]")
        if self.image_suffix not in _IMAGE_SUFFIXES:
            raise ValueError(f"image_suffix: expected one of {_IMAGE_SUFFIXES}")
        for name in ("image_dir", "cam_dir", "gt_dir", "labels_file"):
            value = getattr(self, name)
            if not value or value.startswith("/") or ".." in value.split("/"):
                raise ValueError(f"{name}: must be a relative path inside the input")


@dataclass(frozen=True)
class Entry:
    """One candidate row: where its files are, relative to the input root."""

    image_id: str
    image: str | None  # relative path, None when no image file exists
    cam: str | None
    gt: str | None
    gt_optional: bool  # True: a missing GT file just means "no ground truth"
    label: list[float] | None
    split: str | None
    image_alternates: tuple[str, ...] = ()  # tried in order when `image` does not exist


@dataclass
class Enumeration:
    """What the driver knows before any file is read."""

    entries: list[Entry]
    rejects: list[dict[str, str]]  # rows refused by name alone (image_id, source, reason)
    space: ClassSpace
    label_length: int | None
    digest: str  # sha256 over everything enumerated (names, sizes, label file, split files)
    notes: list[str] = field(default_factory=list)


def _split_arg(arg: str) -> tuple[str, str]:
    name, sep, uri = arg.partition("=")
    if sep and name and "/" not in name:
        return name, uri
    stem = posixpath.basename(arg.rstrip("/")).rsplit(".", 1)[0]
    return stem, arg


def _resolve_relative(input_loc: Location, uri: str) -> Location:
    """A URI, an absolute path, or a path relative to the input directory."""
    if "://" in uri or uri.startswith("/"):
        return resolve(uri, input_loc.options)
    return input_loc.child(*[p for p in uri.split("/") if p])


def _read_text(loc: Location, what: str) -> bytes:
    try:
        return loc.fs.cat_file(loc.path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {loc.uri}") from None


def load_class_space(input_loc: Location, config: IngestConfig) -> ClassSpace:
    """`--classes` (a space name or a classes.txt URI), else the input's `classes.txt`."""
    if config.classes and config.classes.lower() in ("voc", "coco91", "coco81"):
        return class_space_from_arg(config.classes)
    loc = (
        _resolve_relative(input_loc, config.classes)
        if config.classes
        else input_loc.child("classes.txt")
    )
    try:
        text = _read_text(loc, "class list").decode("utf-8")
    except FileNotFoundError:
        if config.classes:
            raise
        raise FileNotFoundError(
            f"no --classes given and no classes.txt in {input_loc.uri}: "
            "pass --classes voc|coco91|coco81|FILE"
        ) from None
    return class_space_from_arg(text if "\n" in text.strip() else text + "\n")


def enumerate_inputs(input_loc: Location, config: IngestConfig) -> Enumeration:
    """Lists the candidate rows (driver side, no per-file reads) and what names alone reject."""
    space = load_class_space(input_loc, config)
    digest = hashlib.sha256()
    digest.update(json.dumps(space.class_names).encode())
    label_bytes = _read_text(input_loc.child(config.labels_file), "image-level label file")
    digest.update(hashlib.sha256(label_bytes).digest())
    try:
        labels = load_cls_labels(label_bytes)
    except CamDecodeError as exc:
        raise ValueError(f"{config.labels_file} refused: {exc}") from None
    lengths = Counter(len(v) for v in labels.values())
    label_length = lengths.most_common(1)[0][0] if lengths else None

    rejects: list[dict[str, str]] = []
    entries: list[Entry] = []
    seen: set[str] = set()

    def reject(image_id: str, source: str, reason: str) -> None:
        rejects.append({schema.IMAGE_ID: image_id, schema.SOURCE: source, schema.REASON: reason})

    def add(image_id: str, source: str, split: str | None, files: dict[str, Any]) -> None:
        try:
            check_image_id(image_id)
        except RowRejected as exc:
            reject(image_id, source, exc.reason)
            return
        if image_id in seen:
            reject(image_id, source, "duplicate image id")
            return
        seen.add(image_id)
        label = labels.get(image_id)
        entries.append(
            Entry(
                image_id=image_id,
                image=files["image"],
                cam=files["cam"],
                gt=files["gt"],
                gt_optional=files["gt_optional"],
                label=None if label is None else [float(x) for x in label],
                split=split,
                image_alternates=files.get("image_alternates", ()),
            )
        )

    if config.splits:
        for arg in config.splits:
            name, uri = _split_arg(arg)
            loc = _resolve_relative(input_loc, uri)
            text = _read_text(loc, f"split list {name!r}")
            digest.update(name.encode() + b"\0" + hashlib.sha256(text).digest())
            for line_no, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
                image_id = line.strip().split(" ")[0] if line.strip() else ""
                if not image_id:
                    continue
                source = f"{posixpath.basename(loc.path)}:{line_no}"
                safe = _is_safe(image_id)
                add(
                    image_id,
                    source,
                    name,
                    {
                        "image": f"{config.image_dir}/{image_id}{config.image_suffix}"
                        if safe
                        else None,
                        "cam": f"{config.cam_dir}/{image_id}.npy" if safe else None,
                        "gt": f"{config.gt_dir}/{image_id}.png" if safe else None,
                        "gt_optional": True,
                        "image_alternates": tuple(
                            f"{config.image_dir}/{image_id}{suffix}"
                            for suffix in _IMAGE_SUFFIXES
                            if suffix != config.image_suffix
                        )
                        if safe
                        else (),
                    },
                )
    else:
        images = _list_folder(input_loc, config.image_dir, _IMAGE_SUFFIXES, digest)
        cams = _list_folder(input_loc, config.cam_dir, (".npy",), digest)
        gts = _list_folder(input_loc, config.gt_dir, (".png",), digest)
        for image_id in sorted(set(images) | set(cams)):
            image_files = images.get(image_id, [])
            cam_files = cams.get(image_id, [])
            source = cam_files[0] if cam_files else image_files[0]
            if len(image_files) > 1 or len(cam_files) > 1:
                add(image_id, source, None, _files(image_files, cam_files, gts, image_id))
                for extra in image_files[1:] + cam_files[1:]:
                    reject(image_id, extra, "duplicate image id")
                continue
            add(image_id, source, None, _files(image_files, cam_files, gts, image_id))
    # An id that only the label file knows about is not an input row (cls_labels usually
    # covers the whole dataset while a run may hold a subset): say how many, quarantine none.
    unlabelled = sum(1 for e in entries if e.label is None)
    notes = []
    if len(labels) > len(entries) + len(rejects):
        notes.append(f"{len(labels) - len(entries)} ids of {config.labels_file} have no files")
    if unlabelled:
        notes.append(f"{unlabelled} images have no entry in {config.labels_file}")
    return Enumeration(entries, rejects, space, label_length, digest.hexdigest(), notes)


def _is_safe(image_id: str) -> bool:
    try:
        check_image_id(image_id)
    except RowRejected:
        return False
    return True


def _files(
    image_files: list[str], cam_files: list[str], gts: dict[str, list[str]], image_id: str
) -> dict[str, Any]:
    gt_files = gts.get(image_id, [])
    return {
        "image": image_files[0] if image_files else None,
        "cam": cam_files[0] if cam_files else None,
        "gt": gt_files[0] if gt_files else None,
        "gt_optional": False,
    }


def _list_folder(
    input_loc: Location, folder: str, suffixes: Sequence[str], digest: Any
) -> dict[str, list[str]]:
    """{image id: [relative paths]} of one folder; the listing's names and sizes feed `digest`."""
    root = input_loc.child(folder)
    try:
        listing = root.fs.find(root.path, detail=True)
    except FileNotFoundError:
        listing = {}
    found: dict[str, list[str]] = {}
    for path in sorted(listing):
        info = listing[path]
        name = posixpath.basename(path)
        stem, dot, suffix = name.rpartition(".")
        if not dot or f".{suffix.lower()}" not in suffixes:
            continue
        digest.update(f"{folder}/{name}\0{info.get('size')}\0".encode())
        found.setdefault(stem, []).append(f"{folder}/{name}")
    return found


# ---------------------------------------------------------------------------------------------
# Chunk task (runs on Ray Data CPU workers)


def chunk_name(index: int) -> str:
    return f"part-{index:05d}"


def ingest_chunk(
    batch: dict[str, np.ndarray],
    *,
    input_loc: Location,
    output_loc: Location,
    config: IngestConfig,
    class_names: Sequence[str],
    space_name: str,
) -> dict[str, np.ndarray]:
    """Ray Data batch wrapper: validates and writes the chunks in `batch`.

    Reads columns `chunk` (int) and `entries` (JSON list of `Entry`); returns one summary row
    per chunk (`chunk`, `record`: the JSON completion record).
    """
    space = ClassSpace(space_name, tuple(class_names))
    records = []
    for chunk, entries_json in zip(batch["chunk"], batch["entries"], strict=True):
        entries = [Entry(**e) for e in json.loads(entries_json)]
        record = write_chunk(int(chunk), entries, input_loc, output_loc, config, space)
        records.append(json.dumps(record))
    return {"chunk": np.asarray(batch["chunk"]), "record": np.asarray(records, dtype=object)}


def write_chunk(
    chunk: int,
    entries: Sequence[Entry],
    input_loc: Location,
    output_loc: Location,
    config: IngestConfig,
    space: ClassSpace,
) -> dict[str, Any]:
    """Fetches, validates and writes one chunk; returns its completion record."""
    limits = RowLimits(max_pixels=config.max_pixels)
    fs = input_loc.fs
    shard_rel = f"shards/{chunk_name(chunk)}.parquet"
    good = 0
    bad: list[dict[str, str]] = []
    with open_atomic(output_loc, shard_rel) as writer_file:
        with pq.ParquetWriter(writer_file, SHARD_SCHEMA, compression="zstd") as writer:
            for start in range(0, len(entries), _FETCH_GROUP):
                group = entries[start : start + _FETCH_GROUP]
                blobs = _fetch(fs, input_loc, [p for e in group for p in (e.image, e.cam, e.gt)])
                images = _find_images(fs, input_loc, group, blobs)
                rows = []
                for entry in group:
                    try:
                        rows.append(_row(entry, images, blobs, config, space, limits))
                    except RowRejected as exc:
                        bad.append(
                            {
                                schema.IMAGE_ID: entry.image_id,
                                schema.SOURCE: entry.cam or entry.image or entry.image_id,
                                schema.REASON: exc.reason,
                            }
                        )
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
                    good += len(rows)
            if good == 0:
                writer.write_table(SHARD_SCHEMA.empty_table())
    record: dict[str, Any] = {
        "chunk": chunk,
        "input_rows": len(entries),
        "files": [_file_entry(output_loc, shard_rel, good)],
        "output": good,
        "quarantined": len(bad),
        "reasons": dict(Counter(_reason_kind(b[schema.REASON]) for b in bad)),
    }
    if bad:
        quarantine = Quarantine(output_loc)
        for b in bad:
            quarantine.add(b[schema.IMAGE_ID], b[schema.SOURCE], b[schema.REASON])
        entry = quarantine.flush(chunk_name(chunk))
        record["files"].append(asdict(entry))
    write_bytes_atomic(
        output_loc, f"{CHUNK_DIR}/{chunk_name(chunk)}.json", json.dumps(record).encode()
    )
    return record


def _row(
    entry: Entry,
    images: dict[str, bytes],
    blobs: dict[str, bytes | None],
    config: IngestConfig,
    space: ClassSpace,
    limits: RowLimits,
) -> dict[str, Any]:
    if entry.cam is None and entry.image is not None:
        raise RowRejected("missing CAM file")
    gt = blobs.get(entry.gt) if entry.gt else None
    return build_row(
        image_id=entry.image_id,
        image=images.get(entry.image_id),
        cam=blobs.get(entry.cam) if entry.cam else None,
        label_vector=entry.label,
        gt=gt,
        source=entry.cam or entry.image or entry.image_id,
        split=entry.split,
        layout=config.layout,
        space=space,
        limits=limits,
    )


def _find_images(
    fs: Any, input_loc: Location, group: Sequence[Entry], blobs: dict[str, bytes | None]
) -> dict[str, bytes]:
    """{image id: image bytes}; ids whose image is missing get their alternates tried."""
    images = {e.image_id: blobs[e.image] for e in group if e.image and blobs.get(e.image)}
    retry = [e for e in group if e.image_id not in images and e.image_alternates]
    if retry:
        more = _fetch(fs, input_loc, [p for e in retry for p in e.image_alternates])
        for entry in retry:
            found = next((more[p] for p in entry.image_alternates if more.get(p)), None)
            if found is not None:
                images[entry.image_id] = found
    return images


def _fetch(
    fs: Any, input_loc: Location, rel_paths: Sequence[str | None]
) -> dict[str, bytes | None]:
    """Reads files concurrently (s3fs batches the GETs); a missing file maps to None."""
    full = {input_loc.join(rel): rel for rel in rel_paths if rel}
    if not full:
        return {}
    got = fs.cat(list(full), on_error="return")
    blobs: dict[str, bytes | None] = {}
    for path, rel in full.items():
        value = got.get(path)
        if isinstance(value, bytes):
            blobs[rel] = value
        elif isinstance(value, FileNotFoundError) or value is None:
            blobs[rel] = None
        else:  # a transient storage error must fail the task (Ray retries it), not the row
            raise OSError(f"reading {rel} failed: {type(value).__name__}: {value}")
    return blobs


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


def _file_entry(loc: Location, rel: str, rows: int) -> dict[str, Any]:
    size = loc.fs.size(loc.join(*rel.split("/")))
    return {"path": rel, "rows": rows, "bytes": int(size)}


def chunk_entries(entries: Sequence[Entry], rows_per_shard: int) -> list[list[Entry]]:
    ordered = sorted(entries, key=lambda e: e.image_id)
    return [ordered[i : i + rows_per_shard] for i in range(0, len(ordered), rows_per_shard)]


def read_records(output_loc: Location, chunks: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Completion records of chunks finished by an earlier attempt (one batched read)."""
    paths = {output_loc.join(CHUNK_DIR, f"{chunk_name(c)}.json"): c for c in chunks}
    if not paths:
        return {}
    got = output_loc.fs.cat(list(paths), on_error="return")
    records = {}
    for path, chunk in paths.items():
        value = got.get(path)
        if isinstance(value, bytes):
            try:
                records[chunk] = json.loads(value)
            except json.JSONDecodeError:
                continue  # a torn record: redo the chunk
    return records


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass(frozen=True)
class IngestResult:
    """What a run did; `ok` is False when the quarantined share exceeded the limit."""

    output_uri: str
    counts: dict[str, int]
    reasons: dict[str, int]
    ok: bool
    message: str


def run_ingest(
    input_uri: str,
    output_uri: str,
    config: IngestConfig,
    *,
    storage: StorageOptions | None = None,
    num_cpus_per_task: float = 0.5,
    overwrite: bool = False,
    report: Any = print,
) -> IngestResult:
    """Runs the ingest stage on the current Ray instance (see the module docstring).

    Args:
        input_uri: dataset root (MCTformer/WeakTr or CLIP-ES layout).
        output_uri: the stage's output directory.
        config: stage options.
        storage: endpoint/region of the object store (credentials come from the AWS chain).
        num_cpus_per_task: CPUs reserved per chunk task (fractional on small machines).
        overwrite: replace an output made with another config or input.
        report: progress sink, one line per call.

    Returns:
        The counts; `ok` False (and no `_SUCCESS`) when too many rows were quarantined.
    """
    import ray

    input_loc = resolve(input_uri, storage)
    output_loc = resolve(output_uri, storage)
    started = time.monotonic()
    found = enumerate_inputs(input_loc, config)
    report(
        f"ingest: {len(found.entries)} candidate rows, {len(found.rejects)} refused by name "
        f"({input_loc.uri}); class space {found.space.name} ({found.space.num_classes} classes)"
    )
    for note in found.notes:
        report(f"ingest: note: {note}")
    stage_config = asdict(config) | {"input_listing_sha256": found.digest}
    out = StageOutput.open(
        output_loc,
        stage="ingest",
        config=stage_config,
        inputs=[InputRef(uri=input_loc.uri)],
        overwrite=overwrite,
    )
    if out.state is StageState.DONE:
        report(out.done_message())
        assert out.manifest is not None
        counts = dict(out.manifest.counts)
        return IngestResult(output_loc.uri, counts, {}, True, out.done_message())

    chunks = chunk_entries(found.entries, config.rows_per_shard)
    records = read_records(output_loc, range(len(chunks))) if out.state is StageState.RESUME else {}
    records = {c: r for c, r in records.items() if isinstance(r, dict)}
    if records:  # a record whose files vanished, changed or were cut short is redone
        listed = [f["path"] for r in records.values() for f in r["files"]]
        sizes = out.existing(listed, check_parquet=False)
        records = {
            c: r
            for c, r in records.items()
            if r.get("input_rows") == len(chunks[c])
            and all(sizes.get(f["path"]) == f["bytes"] for f in r["files"])
        }
    todo = [i for i in range(len(chunks)) if i not in records]
    if records:
        report(f"ingest: resuming: {len(records)} of {len(chunks)} chunks already written")
    if todo:
        items = [{"chunk": i, "entries": json.dumps([asdict(e) for e in chunks[i]])} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ingest_chunk,
            batch_size=1,
            num_cpus=num_cpus_per_task,
            fn_kwargs={
                "input_loc": input_loc,
                "output_loc": output_loc,
                "config": config,
                "class_names": list(found.space.class_names),
                "space_name": found.space.name,
            },
        )
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            records[int(row["chunk"])] = record
            report(
                f"ingest: chunk {len(records)}/{len(chunks)}: {record['output']} rows, "
                f"{record['quarantined']} quarantined ({time.monotonic() - started:.0f} s)"
            )

    files = [FileEntry(**f) for i in sorted(records) for f in records[i]["files"]]
    quarantine = Quarantine(output_loc)
    for r in found.rejects:
        quarantine.add(r[schema.IMAGE_ID], r[schema.SOURCE], r[schema.REASON])
    driver_entry = quarantine.flush("part-driver")
    if driver_entry is not None:
        files.append(driver_entry)
    reasons: Counter[str] = Counter(_reason_kind(r[schema.REASON]) for r in found.rejects)
    for record in records.values():
        reasons.update(record["reasons"])
    good = sum(r["output"] for r in records.values())
    bad = sum(r["quarantined"] for r in records.values()) + len(found.rejects)
    counts = {"input": len(found.entries) + len(found.rejects), "output": good, "quarantined": bad}
    assert counts["input"] == good + bad, counts
    fraction = bad / counts["input"] if counts["input"] else 0.0
    summary = ", ".join(f"{k}: {v}" for k, v in reasons.most_common(5))
    if counts["input"] == 0 or fraction > config.max_error_fraction:
        message = (
            f"{bad} of {counts['input']} rows quarantined ({fraction:.1%} > "
            f"max_error_fraction {config.max_error_fraction:.1%}): {summary or 'no input rows'}; "
            f"see {output_loc.child('quarantine').uri} (outputs kept, no _SUCCESS written)"
            if counts["input"]
            else f"no input rows found in {input_loc.uri}"
        )
        report(f"ingest: FAILED: {message}")
        return IngestResult(output_loc.uri, counts, dict(reasons), False, message)
    out.commit(
        files=files,
        counts=counts,
        class_names=found.space.class_names,
        class_space=found.space.name,
        extra={"quarantine_reasons": dict(reasons)},
    )
    message = (
        f"ingest: {good} rows in {sum(1 for f in files if f.path.startswith('shards/'))} shards, "
        f"{bad} quarantined{(' (' + summary + ')') if summary else ''}; "
        f"{output_loc.uri} ({time.monotonic() - started:.0f} s)"
    )
    report(message)
    return IngestResult(output_loc.uri, counts, dict(reasons), True, message)
