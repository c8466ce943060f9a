"""What `manifest.json` holds, and how readers trust a stage output (docs/CONTRACTS.md).

A directory is a result only once `_SUCCESS` exists; `read_manifest` then validates the JSON
(types, known stage and class space, required counts) and refuses listed paths that could
leave the directory or name bookkeeping files. Downstream stages read only the listed files,
and name their input by the manifest's SHA-256 (`Manifest.input_ref`), so a re-run upstream
changes their fingerprint. Writing a stage output is `pipelines.io.manifest.StageOutput`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from pipelines.io.storage import Location, exists, read_bytes, resolve, safe_relpath

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
RUN_RECORD = "_RUN.json"
STAGES = ("ingest", "refine", "train", "pseudo_masks", "retrain", "evaluate", "pipeline")
CLASS_SPACES = ("voc", "coco91", "coco81", "custom")
REQUIRED_COUNTS = ("input", "output", "quarantined")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class IncompleteOutputError(RuntimeError):
    """A directory without `_SUCCESS` was asked for as a result."""


class ManifestError(ValueError):
    """A manifest is malformed, or a commit does not match the files on storage."""


@dataclass(frozen=True)
class InputRef:
    """One input of a stage: where it is and the digest of its manifest (None for raw data)."""

    uri: str
    manifest_sha256: str | None = None


@dataclass(frozen=True)
class FileEntry:
    """One data file of a stage, relative to the output directory."""

    path: str
    rows: int | None
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated `manifest.json` of a completed stage.

    `extra` holds the manifest's top-level keys beyond the standard ones.
    """

    location: Location
    stage: str
    files: tuple[FileEntry, ...]
    counts: Mapping[str, int]
    class_names: tuple[str, ...]
    class_space: str
    config: Mapping[str, Any]
    inputs: tuple[InputRef, ...]
    code_version: str
    created: str
    metrics: Mapping[str, Any] | None = None
    run_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def entries(self, prefix: str | None = None) -> list[FileEntry]:
        """Listed files, optionally only those under `prefix` (e.g. `"shards/"`)."""
        return [f for f in self.files if prefix is None or f.path.startswith(prefix)]

    def file_paths(self, prefix: str | None = None) -> list[str]:
        """Filesystem paths (for `location.fs` / `location.pyarrow_fs()`) of listed files."""
        return [self.location.join(f.path) for f in self.entries(prefix)]

    def input_ref(self) -> InputRef:
        """How a downstream stage names this output among its inputs."""
        return InputRef(uri=self.location.uri, manifest_sha256=self.sha256)


# The keys of manifest.json that are `Manifest` fields (the others land in `extra`).
STANDARD_KEYS = tuple(
    f.name for f in fields(Manifest) if f.name not in ("location", "extra", "sha256")
)


def read_manifest(location: Location | str, stages: Sequence[str] = ()) -> Manifest:
    """Read and validate the manifest of a completed stage output (of one of `stages`, if any).

    Raises:
        IncompleteOutputError: no `_SUCCESS` (the run is unfinished or failed).
        ManifestError: malformed JSON or fields, or listed paths escaping the directory.
        ValueError: the output is not one of `stages`.
    """
    loc = resolve(location) if isinstance(location, str) else location
    if not exists(loc, SUCCESS):
        raise IncompleteOutputError(
            f"{loc.uri} is incomplete: no {SUCCESS} (the stage has not finished, or failed)"
        )
    try:
        data = read_bytes(loc, MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(f"{loc.uri} has {SUCCESS} but no {MANIFEST}") from None
    manifest = parse_manifest(loc, data)
    if stages and manifest.stage not in stages:
        wanted = " or ".join(stages)
        raise ValueError(f"{loc.uri} is a {manifest.stage!r} output, not an {wanted} output")
    return manifest


def wait_for_success(
    location: Location | str, *, timeout_s: float, poll_s: float = 5.0
) -> Manifest:
    """Block until `_SUCCESS` appears (for downstream jobs), then return the manifest.

    Raises:
        TimeoutError: still incomplete after `timeout_s` seconds.
    """
    loc = resolve(location) if isinstance(location, str) else location
    deadline = time.monotonic() + timeout_s
    while True:
        if exists(loc, SUCCESS):
            return read_manifest(loc)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{loc.uri}: no {SUCCESS} after {timeout_s:g} s")
        time.sleep(min(poll_s, remaining))


def parse_manifest(loc: Location, data: bytes) -> Manifest:
    """The bytes of `loc`'s `manifest.json` as a validated `Manifest` (else ManifestError)."""
    where = f"{loc.uri}/{MANIFEST}"
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where} must hold a JSON object")

    def check(ok: bool, problem: str) -> None:
        if not ok:
            raise ManifestError(f"{where}: {problem}")

    def need(key: str, kind: type | tuple[type, ...], nullable: bool = False) -> Any:
        check(key in doc or nullable, f"missing {key!r}")
        value = doc.get(key)
        ok = isinstance(value, kind) or (nullable and value is None)
        check(ok, f"{key!r} has the wrong type")
        return value

    stage = need("stage", str)
    check(stage in STAGES, f"unknown stage {stage!r}")
    files: dict[str, FileEntry] = {}  # by path: a path listed twice is refused
    for raw in need("files", list):
        ok = isinstance(raw, dict) and set(raw) == {"path", "rows", "bytes"}
        check(ok, "each file needs exactly path, rows, bytes")
        path, rows, size = raw["path"], raw["rows"], raw["bytes"]
        check(isinstance(path, str), "file path must be a string")
        try:
            clean = safe_relpath(path)
        except ValueError as e:
            raise ManifestError(f"{where}: file path escapes the directory: {e}") from None
        check(not _reserved(clean), f"{clean!r} is a reserved name, not a data file")
        check(clean not in files, f"{clean!r} listed twice")
        check(rows is None or _is_count(rows), f"rows of {clean!r} must be a count or null")
        check(_is_count(size), f"bytes of {clean!r} must be a count")
        files[clean] = FileEntry(path=clean, rows=rows, bytes=size)
    counts = need("counts", dict)
    for key in REQUIRED_COUNTS:
        check(key in counts, f"counts lacks {key!r}")
    valid = all(isinstance(k, str) and _is_count(v) for k, v in counts.items())
    check(valid, "counts must map names to non-negative integers")
    class_names = need("class_names", list)
    check(all(isinstance(n, str) for n in class_names), "class_names must be strings")
    class_space = need("class_space", str)
    check(class_space in CLASS_SPACES, f"class_space must be one of {CLASS_SPACES}")
    inputs = []
    for raw in need("inputs", list):
        ok = isinstance(raw, dict) and isinstance(raw.get("uri"), str)
        ok = ok and isinstance(raw.get("manifest_sha256"), str | None)
        check(ok, "each input needs uri and manifest_sha256")
        inputs.append(InputRef(uri=raw["uri"], manifest_sha256=raw.get("manifest_sha256")))
    return Manifest(
        location=loc,
        stage=stage,
        files=tuple(files.values()),
        counts=dict(counts),
        class_names=tuple(class_names),
        class_space=class_space,
        config=need("config", dict),
        inputs=tuple(inputs),
        code_version=need("code_version", str),
        created=need("created", str),
        metrics=need("metrics", dict, nullable=True),
        run_id=need("run_id", str, nullable=True),
        extra={k: v for k, v in doc.items() if k not in STANDARD_KEYS},
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _reserved(rel: str) -> bool:
    """Bookkeeping names: manifest, markers, run record and anything top-level starting `_`."""
    top = rel.split("/", 1)[0]
    return rel == MANIFEST or top.startswith("_") or top.startswith(".")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
