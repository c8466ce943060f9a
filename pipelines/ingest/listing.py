"""What the ingest driver knows before reading any file: the candidate rows and the class space.

With split lists nothing is listed: each id's files are named from the config's folders;
without them every image and CAM file found is a row. Rows that names alone reject (unsafe
ids, duplicates) never reach a task; the listing's names and sizes feed the fingerprint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.ingest.config import IMAGE_SUFFIXES, IngestConfig
from pipelines.io import schema
from pipelines.io.class_spaces import ClassSpace, class_space_from_arg
from pipelines.io.rows import RowRejected, check_image_id
from pipelines.io.safe_pickle import CamDecodeError, load_cls_labels
from pipelines.io.storage import Location, resolve


@dataclass(frozen=True)
class Entry:
    """One candidate row: where its files are, relative to the input root."""

    image_id: str
    image: str | None  # relative path, None when no image file exists
    cam: str | None
    gt: str | None  # a missing GT file just means "no ground truth"
    label: str | None  # `pack_label` of the image's cls_labels vector; None: not in the file
    split: str | None
    image_alternates: tuple[str, ...] = ()  # tried in order when `image` does not exist


def pack_label(vector: np.ndarray) -> str:
    """An image-level label vector as the base64 of its float32 bytes: exact, and about a
    fifth of the memory of a list of Python floats (100k COCO images: ~45 MB, not ~260 MB on
    the driver), as it travels in every chunk's task item."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def unpack_label(packed: str | None) -> np.ndarray | None:
    """The float32 vector `pack_label` packed (None stays None)."""
    if packed is None:
        return None
    return np.frombuffer(base64.b64decode(packed), dtype="<f4")


@dataclass
class Enumeration:
    """What the driver knows before any file is read."""

    entries: list[Entry]
    rejects: list[dict[str, str]]  # rows refused by name alone (image_id, source, reason)
    space: ClassSpace
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
    loc = _resolve_relative(input_loc, config.classes or "classes.txt")
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

    rejects: list[dict[str, str]] = []
    entries: list[Entry] = []
    seen: set[str] = set()

    def reject(image_id: str, source: str, reason: str) -> None:
        rejects.append({schema.IMAGE_ID: image_id, schema.SOURCE: source, schema.REASON: reason})

    def add(
        image_id: str,
        source: str,
        split: str | None,
        files: Sequence[str | None],  # image, CAM, GT
        alternates: Sequence[str] = (),
    ) -> None:
        """A candidate row of (image, CAM, GT) files, unless its id is unsafe or repeated."""
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
        packed = None if label is None else pack_label(label)
        image, cam, gt = files
        entries.append(Entry(image_id, image, cam, gt, packed, split, tuple(alternates)))

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
                image, cam = f"{config.image_dir}/{image_id}", f"{config.cam_dir}/{image_id}.npy"
                others = [image + x for x in IMAGE_SUFFIXES if x != config.image_suffix]
                files = (image + config.image_suffix, cam, f"{config.gt_dir}/{image_id}.png")
                add(image_id, f"{posixpath.basename(loc.path)}:{line_no}", name, files, others)
    else:
        images = _list_folder(input_loc, config.image_dir, IMAGE_SUFFIXES, digest)
        cams = _list_folder(input_loc, config.cam_dir, (".npy",), digest)
        gts = _list_folder(input_loc, config.gt_dir, (".png",), digest)
        for image_id in sorted(set(images) | set(cams)):
            image_files, cam_files, gt_files = (d.get(image_id, []) for d in (images, cams, gts))
            found = [next(iter(paths), None) for paths in (image_files, cam_files, gt_files)]
            add(image_id, cam_files[0] if cam_files else image_files[0], None, found)
            for extra in image_files[1:] + cam_files[1:]:
                reject(image_id, extra, "duplicate image id")
    # An id that only the label file knows about is not an input row (cls_labels usually
    # covers the whole dataset while a run may hold a subset): say how many, quarantine none.
    unlabelled = sum(1 for e in entries if e.label is None)
    notes = []
    if len(labels) > len(entries) + len(rejects):
        notes.append(f"{len(labels) - len(entries)} ids of {config.labels_file} have no files")
    if unlabelled:
        notes.append(f"{unlabelled} images have no entry in {config.labels_file}")
    return Enumeration(entries, rejects, space, digest.hexdigest(), notes)


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
