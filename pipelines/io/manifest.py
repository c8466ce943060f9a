"""A stage's output directory: run record, resumable data files, manifest, `_SUCCESS` last.

Layout and rules: docs/CONTRACTS.md "A stage's output directory" and "Re-running".
`StageOutput.open` takes the output's lease (`pipelines.io.lease`: one live run per output),
then records the run's fingerprint (stage + config + inputs) in `_RUN.json` before any data.
Every manifest carries a unique `run_id`, so a re-run stage has a new digest and the stages
after it see a different fingerprint. Reading an output is `manifest_format`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import subprocess
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.io import schema
from pipelines.io.lease import LEASE, Lease, OutputBusyError
from pipelines.io.manifest_format import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    RUN_RECORD,
    STAGES,
    STANDARD_KEYS,
    SUCCESS,
    FileEntry,
    InputRef,
    Manifest,
    ManifestError,
    parse_manifest,
    read_manifest,
    wait_for_success,  # noqa: F401  (re-exported: pipelines.retrain.stage, README)
)
from pipelines.io.storage import (
    Location,
    exists,
    read_bytes,
    redact,
    remove_tree,
    safe_relpath,
    write_bytes_atomic,
)

QUARANTINE_DIR = "quarantine"
MAX_REASON_CHARS = 500
_PACKAGE = "weakclip-pipeline"


class StageState(Enum):
    """What `StageOutput.open` found in the output directory."""

    FRESH = "fresh"  # nothing there (or just deleted by overwrite): do all the work
    RESUME = "resume"  # same config and inputs, interrupted: finish the missing files
    DONE = "done"  # same config and inputs, `_SUCCESS` present: nothing to do


class StageConflictError(RuntimeError):
    """The output directory holds another run's outputs (or foreign files)."""


@dataclasses.dataclass(eq=False)
class StageOutput:
    """The output directory of one run of a stage. Create with `StageOutput.open`."""

    location: Location
    stage: str
    config: dict[str, Any]
    inputs: tuple[InputRef, ...]
    fingerprint: str
    state: StageState
    manifest: Manifest | None
    lease: Lease | None = None  # held until the commit (or until this object goes)

    @classmethod
    def open(
        cls,
        location: Location,
        *,
        stage: str,
        config: Mapping[str, Any] | Any,
        inputs: Sequence[InputRef],
        overwrite: bool = False,
    ) -> StageOutput:
        """Inspect (and if needed prepare) the output directory `location` of a run of `stage`
        with `config` (a dict or dataclass of JSON values) reading `inputs`; `overwrite`
        deletes an earlier stage run there (even a complete one with the same config).

        A complete output is returned without the lease; any other holds it until `commit`.

        Raises:
            OutputBusyError: another live run holds the directory (nothing touched).
            StageConflictError: the directory holds a run with another stage, config or inputs
                (and not `overwrite`), or files no stage run wrote (never deleted).
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        lease = Lease.acquire(location, stage=stage)
        try:
            out = cls._open_leased(location, stage, config, inputs, overwrite)
        except BaseException:
            lease.release()
            raise
        if out.state is StageState.DONE:
            lease.release()
        else:
            out.lease = lease
            weakref.finalize(out, lease.release_soon)
        return out

    @classmethod
    def _open_leased(
        cls,
        location: Location,
        stage: str,
        config: Mapping[str, Any] | Any,
        inputs: Sequence[InputRef],
        overwrite: bool,
    ) -> StageOutput:
        """`open` once the lease is held."""
        config_dict = _jsonable_config(config)
        input_refs = tuple(inputs)
        fp = fingerprint(stage, config_dict, input_refs)
        run = _read_run_record(location)
        occupied = _has_content(location)
        if occupied and run is None and not exists(location, MANIFEST):
            raise StageConflictError(
                f"{location.uri} is not empty and holds no stage run ({RUN_RECORD} missing): "
                "choose an empty --output; this directory is never written into or deleted"
            )
        if occupied and overwrite:  # `_SUCCESS` first: no reader trusts a half-deleted output
            for name in (SUCCESS, MANIFEST):
                if exists(location, name):
                    location.fs.rm(location.join(name))
            for name in _child_names(location):
                if not name.startswith(LEASE):
                    remove_tree(location.child(name))
            occupied = False
        elif occupied and (run is None or run.get("fingerprint") != fp):
            why = _describe_difference(run, stage, config_dict, input_refs)
            raise StageConflictError(
                f"{location.uri} holds outputs of a different run ({why}); "
                "use another --output, or --overwrite to replace them (later stages must "
                "then be re-run too)"
            )
        common = dict(stage=stage, config=config_dict, inputs=input_refs, fingerprint=fp)
        if occupied:
            if exists(location, SUCCESS):
                return cls(
                    location, **common, state=StageState.DONE, manifest=read_manifest(location)
                )
            return cls(location, **common, state=StageState.RESUME, manifest=None)
        record = {
            "stage": stage,
            "fingerprint": fp,
            # Unique per run, copied into the manifest: a re-run never reproduces the digest
            # of an earlier manifest, even within the same second.
            "run_id": uuid.uuid4().hex,
            "config": config_dict,
            "inputs": [dataclasses.asdict(i) for i in input_refs],
            "code_version": code_version(),
            "started": _utc_now(),
        }
        write_bytes_atomic(location, RUN_RECORD, _dumps(record))
        return cls(location, **common, state=StageState.FRESH, manifest=None)

    def done_message(self) -> str:
        """One line for the user when there is nothing to do."""
        return (
            f"{self.stage}: {self.location.uri} is already complete with the same config and "
            "inputs; nothing to do (--overwrite recomputes it)"
        )

    def existing(self, rel_paths: Iterable[str], *, check_parquet: bool = True) -> dict[str, int]:
        """Which of the expected files exist, with their sizes (one listing); with
        `check_parquet`, a `.parquet` file only if it ends with the footer magic."""
        wanted = {safe_relpath(r) for r in rel_paths}
        found = {rel: size for rel, size in _list_sizes(self.location).items() if rel in wanted}
        if check_parquet:
            fs = self.location.fs
            for rel, size in list(found.items()):
                if rel.endswith(".parquet"):
                    path = self.location.join(rel)
                    if size < 12 or fs.cat_file(path, start=size - 4, end=size) != b"PAR1":
                        del found[rel]
        return found

    def commit(
        self,
        *,
        files: Sequence[FileEntry],
        counts: Mapping[str, int],
        class_names: Sequence[str],
        class_space: str,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Check `files` (every data file, quarantine included) on storage, write
        `manifest.json`, then `_SUCCESS` last; `extra`: further top-level keys.

        Raises:
            ManifestError: a file missing, of another size, listed twice or at a reserved or
                unsafe path; a malformed field, or an `extra` key shadowing a standard one.
            StageConflictError: another run took over the directory meanwhile.
        """
        if self.state is StageState.DONE:
            raise RuntimeError(f"{self.location.uri} is already complete; nothing to commit")
        if self.lease is not None:
            self.lease.check()
        run = _read_run_record(self.location)
        if run is None or run.get("fingerprint") != self.fingerprint:
            raise OutputBusyError(f"{self.location.uri} was taken over by another run")
        doc: dict[str, Any] = {
            "stage": self.stage,
            "files": [dataclasses.asdict(f) for f in files],
            "counts": dict(counts),
            "class_names": list(class_names),
            "class_space": class_space,
            "config": self.config,
            "inputs": [dataclasses.asdict(i) for i in self.inputs],
            "code_version": code_version(),
            "created": _utc_now(),
            "metrics": dict(metrics) if metrics is not None else None,
            "run_id": run.get("run_id"),
        }
        for key, value in (extra or {}).items():
            if key in STANDARD_KEYS:
                raise ManifestError(f"extra key {key!r} shadows a standard manifest key")
            doc[key] = value
        data = _dumps(doc)
        manifest = parse_manifest(self.location, data)  # same checks as every reader
        sizes = _list_sizes(self.location)
        problems = []
        for entry in manifest.files:
            actual = sizes.get(entry.path)
            if actual is None:
                problems.append(f"{entry.path}: missing")
            elif actual != entry.bytes:
                problems.append(f"{entry.path}: {actual} bytes on storage, {entry.bytes} listed")
        if problems:
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            shown = "; ".join(problems[:5]) + more
            raise ManifestError(f"cannot commit {self.location.uri}: {shown}")
        write_bytes_atomic(self.location, MANIFEST, data)
        write_bytes_atomic(self.location, SUCCESS, b"")
        self.state = StageState.DONE
        self.manifest = manifest
        if self.lease is not None:
            self.lease.release()
        return manifest


class Quarantine:
    """Collects rejected rows and writes them as `quarantine/<name>.parquet`
    (`schema.QUARANTINE_COLUMNS`); `files` and `count` are what it wrote."""

    SCHEMA = schema.arrow_schema(schema.QUARANTINE_COLUMNS)

    def __init__(self, location: Location) -> None:
        self.location = location
        self.files: list[FileEntry] = []
        self.count = 0
        self._pending: list[dict[str, str]] = []

    def add(self, image_id: str, source: str, reason: str) -> None:
        """Queue one rejected row; `reason` is cut to one redacted line of at most
        `MAX_REASON_CHARS`."""
        line = " ".join(redact(str(reason)).split())
        if len(line) > MAX_REASON_CHARS:
            line = line[: MAX_REASON_CHARS - 3] + "..."
        self._pending.append(
            {schema.IMAGE_ID: str(image_id), schema.SOURCE: str(source), schema.REASON: line}
        )

    def flush(self, name: str) -> FileEntry | None:
        """Write the queued rows as `quarantine/<name>.parquet` (nothing if none are queued)."""
        if not self._pending:
            return None
        table = pa.Table.from_pylist(self._pending, schema=self.SCHEMA)
        entry = write_parquet(self.location, f"{QUARANTINE_DIR}/{name}.parquet", table)
        self.files.append(entry)
        self.count += len(self._pending)
        self._pending = []
        return entry


def write_parquet(
    location: Location,
    rel: str,
    table: pa.Table,
    *,
    compression: str = "zstd",
    rows_per_group: int | None = None,
) -> FileEntry:
    """Write `table` to `rel` below `location` in one atomic put (row groups of
    `rows_per_group` rows; None: pyarrow's default); its `FileEntry`."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=compression, row_group_size=rows_per_group)
    data = buffer.getvalue()
    write_bytes_atomic(location, rel, data)
    return FileEntry(path=safe_relpath(rel), rows=table.num_rows, bytes=len(data))


def fingerprint(stage: str, config: Mapping[str, Any], inputs: Sequence[InputRef]) -> str:
    """SHA-256 of stage, config and inputs; not the code version (an upgrade does not
    invalidate finished outputs)."""
    doc = {"stage": stage, "config": config, "inputs": [dataclasses.asdict(i) for i in inputs]}
    return hashlib.sha256(_canonical(doc)).hexdigest()


@functools.cache
def code_version() -> str:
    """Package version, plus `git describe` when running from this package's own checkout."""
    try:
        version = importlib.metadata.version(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # pipelines/io/manifest.py → the checkout's root, three levels up
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(root, ".git")):
        git = ["git", "-C", root, "describe", "--always", "--dirty", "--tags"]
        try:
            run = subprocess.run(git, capture_output=True, text=True, timeout=5, check=True)
            described = run.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            described = ""
        if described:
            return f"{version}+git.{described}"
    return version


def _read_run_record(location: Location) -> dict[str, Any] | None:
    try:
        data = read_bytes(location, RUN_RECORD, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _child_names(location: Location) -> list[str]:
    """Names of the entries directly below `location` (none when it does not exist)."""
    try:
        listed = location.fs.ls(location.path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed]


def _has_content(location: Location) -> bool:
    """Whether the directory holds anything but the lease (and its temporary files)."""
    return any(not name.startswith(LEASE) for name in _child_names(location))


def _list_sizes(location: Location) -> dict[str, int]:
    """Relative path → size of every file under `location`, in one listing."""
    fs = location.fs
    try:
        found = fs.find(location.path, detail=True)
    except FileNotFoundError:
        return {}
    root = location.path.rstrip("/") + "/"
    return {
        path[len(root) :]: int(info["size"])
        for path, info in found.items()
        if info.get("type") == "file" and path.startswith(root)
    }


def _describe_difference(
    run: Mapping[str, Any] | None, stage: str, config: Mapping[str, Any], inputs: Sequence[InputRef]
) -> str:
    if not run:
        return f"no readable {RUN_RECORD}"
    if run.get("stage") != stage:
        return f"stage {run.get('stage')!r}, not {stage!r}"
    old_config = run.get("config") or {}
    keys = set(old_config) | set(config)
    changed = sorted(k for k in keys if _canonical(old_config.get(k)) != _canonical(config.get(k)))
    parts = []
    if changed:
        parts.append(
            "config differs in " + ", ".join(changed[:8]) + ("…" if len(changed) > 8 else "")
        )
    if run.get("inputs") != [dataclasses.asdict(i) for i in inputs]:
        parts.append("inputs differ")
    return "; ".join(parts) or "fingerprint differs"


def _jsonable_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict or dataclass, got {type(config).__name__}")
    try:
        # Round trip: tuples become lists, so a reloaded run record compares equal.
        return json.loads(json.dumps(dict(config), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"config is not JSON-serialisable: {e}") from None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
