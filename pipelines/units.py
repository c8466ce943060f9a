"""The unit of work every data stage shares (docs/ARCHITECTURE.md, "The unit of work").

A unit (rows of the input, named `unit_name` after its first row group) runs as Ray tasks
(`pipelines.parts.run_parts`; evaluate's batches of units: `run_tasks`) and writes its
outputs, then its completion record (`write_unit`); `resume` skips what an earlier
attempt finished; `tally_records` and `gate_and_commit` sum the records, gate on errors and
commit the manifest. A record is a JSON object with at least `files` ([{"path", "rows",
"bytes"}]), `output`, `quarantined` and `reasons`.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar

from pipelines.io.manifest import (
    FileEntry,
    Manifest,
    Quarantine,
    StageOutput,
    StageState,
    write_parquet,
)
from pipelines.io.storage import (
    Location,
    read_json_objects,
    redact,
    safe_relpath,
    write_bytes_atomic,
)

UNIT_DIR = "_units"  # completion records of finished units (bookkeeping, not data files)
SHARD_DIR = "shards"
_THREADS = 16
UNIT_BYTES = 96 * 2**20  # what the default rows per unit aims at: ~96 MiB shards
ROWS_PER_GROUP = 16  # rows per Parquet row group of a stage's shards: what later stages read
AUTO_MAX_ROWS = 65_536

K = TypeVar("K")
T = TypeVar("T")
U = TypeVar("U")
R = TypeVar("R")
Record = dict[str, Any]


def unit_name(shard_path: str, row_group: int) -> str:
    """`<shard stem>-rg<NNNN>`: the name of a row-group unit and of everything it writes."""
    return f"{posixpath.basename(shard_path).removesuffix('.parquet')}-rg{row_group:04d}"


def unit_source(shard_path: str) -> tuple[str, int] | None:
    """The (input shard, row group) that the unit writing `shard_path` was made from, read back
    from its `unit_name` (`shards/<stem>-rg<NNNN>.parquet` → (`shards/<stem>.parquet`, N));
    None for another name."""
    stem, sep, group = posixpath.basename(shard_path).removesuffix(".parquet").rpartition("-rg")
    if not (sep and stem and len(group) >= 4 and group.isdigit()):
        return None
    return f"{SHARD_DIR}/{stem}.parquet", int(group)


def shard_rel(unit: str) -> str:
    """`shards/<unit>.parquet`: where a unit writes its rows."""
    return f"{SHARD_DIR}/{unit}.parquet"


def record_rel(unit: str, record_dir: str = UNIT_DIR) -> str:
    """`_units/<unit>.json`: where a unit's completion record lives."""
    return f"{record_dir}/{unit}.json"


@dataclass(frozen=True)
class StageResult:
    """What a run of a data stage did; `ok` is False when the quarantined share exceeded the
    limit (outputs kept, no `_SUCCESS`)."""

    output_uri: str
    counts: dict[str, int]
    metrics: dict[str, Any] | None
    ok: bool
    message: str
    skipped: bool = False  # the output was already complete
    seconds: float = 0.0  # driver wall time of this call


def unit_fields(unit: Any) -> dict[str, Any]:
    """A unit dataclass as the fields of its record: `unit` (its `name`) and the others, as
    JSON gives them back (tuples as lists)."""
    fields = {k: v for k, v in asdict(unit).items() if k != "name"}
    return {"unit": unit.name, **json.loads(json.dumps(fields))}


def rows_per_unit_for(bytes_per_row: float, *, target_bytes: int = UNIT_BYTES) -> int:
    """The default rows per unit: about `target_bytes` of output per unit (its shard), at
    least 1 and at most `AUTO_MAX_ROWS` rows."""
    if bytes_per_row <= 0:
        return AUTO_MAX_ROWS
    return max(1, min(AUTO_MAX_ROWS, int(target_bytes // bytes_per_row)))


def group_row_groups(
    shards: Sequence[tuple[str, Sequence[int]]], rows_per_unit: int
) -> list[list[tuple[str, int, int]]]:
    """Consecutive row groups of the input (`shards`: path and the row count of each of its
    row groups, in manifest order) gathered into units of whole row groups: a unit takes row
    groups while it stays within `rows_per_unit` rows (a row group bigger than that is a unit
    alone); units may span shards. Each unit: [(path, row group, rows), ...]."""
    units: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    size = 0
    for path, groups in shards:
        for group, rows in enumerate(groups):
            if current and size + rows > rows_per_unit:
                units.append(current)
                current, size = [], 0
            current.append((path, group, int(rows)))
            size += int(rows)
    if current:
        units.append(current)
    return units


def record_matches(unit: Any, record: Mapping[str, Any]) -> bool:
    """Whether a record found on disk is this unit's: the same `unit_fields`."""
    return all(record.get(key) == value for key, value in unit_fields(unit).items())


def listed_shards(manifest: Manifest) -> list[str]:
    """The data shards (`shards/*.parquet`) an input manifest lists, in its order."""
    return [f.path for f in manifest.entries(f"{SHARD_DIR}/") if f.path.endswith(".parquet")]


def map_shards(fn: Callable[[str], T], shards: Sequence[str]) -> list[T]:
    """`fn` on every shard on a thread pool (storage round trips overlap), in shard order."""
    with ThreadPoolExecutor(max_workers=min(_THREADS, max(1, len(shards)))) as pool:
        return list(pool.map(fn, shards))


def check_unit_names(names: Iterable[str]) -> None:
    """Refuses (ValueError) units that share a name or whose outputs would leave the output."""
    names = list(names)
    repeated = [n for n, c in Counter(names).items() if c > 1]
    if repeated:
        raise ValueError(
            f"input shards share file names (units {repeated[:3]}): cannot name outputs"
        )
    for name in names:
        safe_relpath(shard_rel(name))


def read_records(
    loc: Location,
    units: Mapping[K, U],
    matches: Callable[[U, Record], bool],
    rel: Callable[[K], str],
) -> dict[K, Record]:
    """The completion records (at `rel(key)` below `loc`) of `units` in one batched read; one
    missing, torn or not `matches(unit, record)` is left out (its unit is redone)."""
    keys = {str(key): key for key in units}
    found = read_json_objects(loc, {name: rel(key) for name, key in keys.items()})
    return {
        keys[name]: record for name, record in found.items() if matches(units[keys[name]], record)
    }


def keep_intact(out: StageOutput, records: Mapping[K, Record]) -> dict[K, Record]:
    """The records whose listed files all still have their recorded sizes (one listing)."""
    if not records:
        return {}
    listed = [f["path"] for r in records.values() for f in r["files"]]
    sizes = out.existing(listed, check_parquet=False)
    return {
        key: record
        for key, record in records.items()
        if all(sizes.get(f["path"]) == f["bytes"] for f in record["files"])
    }


def resume(
    out: StageOutput,
    units: Mapping[K, U],
    matches: Callable[[U, Record], bool],
    *,
    rel: Callable[[K], str] = record_rel,  # type: ignore[assignment]
) -> dict[K, Record]:
    """The records of the units an earlier attempt finished (`read_records`, `keep_intact`);
    nothing unless the output is being resumed."""
    if out.state is not StageState.RESUME:
        return {}
    return keep_intact(out, read_records(out.location, units, matches, rel))


def run_tasks(
    units: Sequence[Mapping[str, Any]],
    fn: Callable[..., Any],
    *,
    num_cpus: float,
    fn_kwargs: Mapping[str, Any],
    batch_size: int = 1,
) -> Iterator[Record]:
    """One Ray Data task `fn` per `batch_size` units (JSON in column `unit`); yields the
    records it returns (JSON in column `record`) as they come back."""
    if not units:
        return
    import ray

    items = [{"unit": json.dumps(unit)} for unit in units]
    blocks = math.ceil(len(items) / batch_size)
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        fn, batch_size=batch_size, num_cpus=num_cpus, fn_kwargs=dict(fn_kwargs)
    )
    for row in ds.iter_rows():
        yield json.loads(row["record"])


def write_unit(
    loc: Location,
    unit: str,
    record: Mapping[str, Any],
    *,
    table: Any = None,
    rejected: Sequence[tuple[str, str, str]] = (),
    files: Sequence[Mapping[str, Any]] = (),
    record_dir: str = UNIT_DIR,
    drop_parenthesis: bool = False,
    rows_per_group: int | None = None,
) -> Record:
    """Writes a unit's rows (`table`, to `shard_rel(unit)` unless empty) and quarantined rows
    (`rejected`: image id, source, reason) into the stage output `loc`, then its completion
    record (`record_rel(unit, record_dir)`): `record` with `files` (`files` the unit wrote
    itself first), `quarantined` and `reasons` ({`reason_kind`: count}), which it returns."""
    listed = [dict(f) for f in files]
    if table is not None and table.num_rows:
        entry = write_parquet(loc, shard_rel(unit), table, rows_per_group=rows_per_group)
        listed.append(asdict(entry))
    quarantine = Quarantine(loc)
    for image_id, source, reason in rejected:
        quarantine.add(image_id, source, reason)
    quarantine.flush(unit)
    listed += [asdict(entry) for entry in quarantine.files]
    reasons = Counter(reason_kind(r[2], drop_parenthesis=drop_parenthesis) for r in rejected)
    done = {**record, "files": listed, "quarantined": len(rejected), "reasons": dict(reasons)}
    write_bytes_atomic(loc, record_rel(unit, record_dir), json.dumps(done).encode())
    return done


def reason_kind(reason: str, *, drop_parenthesis: bool = False) -> str:
    """The kind of a quarantine reason (manifest `quarantine_reasons`): the text before its
    first ":" (and, with `drop_parenthesis`, before a " (" detail)."""
    kind = reason.split(":")[0]
    return kind.split(" (")[0] if drop_parenthesis else kind


@dataclass
class Tally:
    """The records of a stage's units summed: rows written, rows quarantined, why, files."""

    output: int = 0
    quarantined: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    files: list[FileEntry] = field(default_factory=list)

    def summary(self) -> str:
        """The five most common reasons, `kind: count, ...` ('' when none)."""
        return ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common(5))

    def summary_suffix(self) -> str:
        """` (<summary>)`, or '' when nothing was quarantined."""
        summary = self.summary()
        return f" ({summary})" if summary else ""


def tally_records(records: Iterable[Mapping[str, Any]]) -> Tally:
    """Sums `output`, `quarantined`, `reasons` and lists `files` of the records, in order."""
    tally = Tally()
    for record in records:
        tally.output += record["output"]
        tally.quarantined += record["quarantined"]
        tally.reasons.update(record["reasons"])
        tally.files.extend(FileEntry(**f) for f in record["files"])
    return tally


def error_gate(bad: int, total: int, max_error_fraction: float, what: str = "rows") -> str | None:
    """`<bad> of <total> <what> quarantined (<share> > max_error_fraction <limit>)` when more
    than `max_error_fraction` of `total` are bad, else None (the gate every stage applies)."""
    fraction = bad / total if total else 0.0
    if fraction <= max_error_fraction:
        return None
    return (
        f"{bad} of {total} {what} quarantined ({fraction:.1%} > max_error_fraction "
        f"{max_error_fraction:.1%})"
    )


def gate_and_commit(
    stage: str,
    out: StageOutput,
    tally: Tally,
    counts: Mapping[str, int],
    *,
    max_error_fraction: float,
    started: float,
    result: Callable[..., R],
    summary: tuple[str, str],
    report: Callable[[str], Any],
    class_names: Sequence[str],
    class_space: str,
    metrics: Mapping[str, Any] | None = None,
    scores: Mapping[str, str] | None = None,
    rows: str = "input",
    units: int | None = None,
    written: Callable[[], tuple[list[FileEntry], dict[str, Any]]] = lambda: ([], {}),
) -> R:
    """Fails (reported, redacted; outputs kept, no `_SUCCESS`) when more than
    `max_error_fraction` of `counts[rows]` rows were quarantined; else writes `written()` (files,
    first `extra` keys), commits `out` (`counts` + the tally's `output`, `quarantined`; `extra` +
    `quarantine_reasons`, `units`) and reports `<stage>: <summary[0]>, <N> quarantined
    (<reasons>)<summary[1]>; mIoU (<space>, <n> images with GT): <label> <mIoU>, ...; <output>
    (<s> s)`, the mIoU of the `metrics` keys in `scores` (key: label). Returns `result(uri,
    counts, metrics, ok, message, seconds=...)`; RuntimeError when the tally's rows do not add
    up to `counts[rows]`.
    """
    counts = {**counts, "output": tally.output, "quarantined": tally.quarantined}
    total, loc = counts[rows], out.location
    if tally.output + tally.quarantined != total:
        raise RuntimeError(f"row counts do not add up: {counts}")
    finish = partial(result, loc.uri, counts, metrics)
    refused = error_gate(tally.quarantined, total, max_error_fraction)
    if refused:
        message = (
            f"{refused}: {tally.summary()}; see {loc.child('quarantine').uri} (outputs kept, "
            "no _SUCCESS written)"
        )
        report(f"{stage}: FAILED: {redact(message)}")
        return finish(False, message, seconds=time.monotonic() - started)
    files, extra = written()
    extra["quarantine_reasons"] = dict(tally.reasons)
    if units is not None:
        extra["units"] = units
    out.commit(
        files=tally.files + files,
        counts=counts,
        class_names=class_names,
        class_space=class_space,
        metrics=metrics,
        extra=extra,
    )
    head, detail = summary
    if metrics is not None and scores:
        shown = ", ".join(f"{label} {pct(metrics[key]['miou'])}" for key, label in scores.items())
        detail += f"; mIoU ({class_space}, {metrics['gt_images']} images with GT): {shown}"
    seconds = time.monotonic() - started
    message = (
        f"{stage}: {head}, {tally.quarantined} quarantined{tally.summary_suffix()}{detail}; "
        f"{loc.uri} ({seconds:.0f} s)"
    )
    report(message)
    return finish(True, message, seconds=seconds)


def already_done(out: StageOutput, report: Callable[[str], Any]) -> dict[str, Any]:
    """Reports a complete output with this fingerprint; its `StageResult` fields."""
    assert out.manifest is not None
    message = out.done_message()
    report(message)
    return dict(
        output_uri=out.location.uri,
        counts=dict(out.manifest.counts),
        metrics=dict(out.manifest.metrics) if out.manifest.metrics else None,
        ok=True,
        message=message,
        skipped=True,
    )


def pct(value: float | None) -> str:
    """A score as a percentage with one decimal; `n/a` for None or NaN."""
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"
