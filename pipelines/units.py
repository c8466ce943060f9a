"""The unit of work every data stage shares (docs/ARCHITECTURE.md, "The unit of work").

A stage cuts its input into *units*, each named only by the input, run as one Ray task, and
finished by a *completion record* written last. The driver of a stage reads as:

    units = <stage>.enumerate_units(...)             # names from metadata only
    records = resume(out, {name: unit}, matches)      # units an earlier attempt finished
    for row in run_tasks(items_of(todo), fn, ...):    # the missing ones, one task each
        records[name] = json.loads(row["record"])
    tally = tally_records(records in unit order)      # rows, quarantined, reasons, files
    failure = error_gate(stage, tally, total, ...)     # the message, or None
    out.commit(files=tally.files, ...)                # only when the gate passes

Names: a row-group unit is `unit_name(shard, row_group)` = `<shard stem>-rg<NNNN>`; it writes
`shard_rel(unit)` = `shards/<unit>.parquet`, `quarantine/<unit>.parquet` and last its record
`record_rel(unit)` = `_units/<unit>.json` (ingest's chunks keep `_chunks/part-<NNNNN>.json`).

Enumeration: `listed_shards` (the data shards an input manifest lists), `map_shards` (one call
per shard on a thread pool: footers, a few columns) and `check_unit_names` (no two units share
a name, and every name is a safe relative path).

Records and resume: `read_records` reads the records of `units` ({key: unit}) in one batched
request and keeps those that `matches` their unit (a torn record, or one for another layout of
units, is redone); `keep_intact` keeps those whose listed files all still have their recorded
sizes; `resume` is both, and nothing unless the output is being resumed. A record is a JSON
object with at least `files` ([{"path", "rows", "bytes"}]), `output`, `quarantined` and
`reasons` ({kind: count}).

Gate: `tally_records` sums the records; `error_gate` returns the one-line failure message when
the quarantined share exceeds `max_error_fraction` (outputs kept, no `_SUCCESS`), else None.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipelines.io.manifest import FileEntry, Manifest, StageOutput, StageState
from pipelines.io.storage import Location, read_json_objects, redact, safe_relpath

UNIT_DIR = "_units"  # completion records of finished units (bookkeeping, not data files)
SHARD_DIR = "shards"
_THREADS = 16

K = TypeVar("K")
T = TypeVar("T")
U = TypeVar("U")
Record = dict[str, Any]


def unit_name(shard_path: str, row_group: int) -> str:
    """`<shard stem>-rg<NNNN>`: the name of a row-group unit and of everything it writes."""
    stem = posixpath.basename(shard_path)
    stem = stem[: -len(".parquet")] if stem.endswith(".parquet") else stem
    return f"{stem}-rg{row_group:04d}"


def shard_rel(unit: str) -> str:
    return f"{SHARD_DIR}/{unit}.parquet"


def record_rel(unit: str, record_dir: str = UNIT_DIR) -> str:
    return f"{record_dir}/{unit}.json"


def listed_shards(manifest: Manifest) -> list[str]:
    """The data shards (`shards/*.parquet`) an input manifest lists, in its order."""
    return [f.path for f in manifest.entries(f"{SHARD_DIR}/") if f.path.endswith(".parquet")]


def map_shards(fn: Callable[[str], T], shards: Sequence[str]) -> list[T]:
    """`fn` on every shard on a thread pool (storage round trips overlap), in shard order."""
    with ThreadPoolExecutor(max_workers=min(_THREADS, max(1, len(shards)))) as pool:
        return list(pool.map(fn, shards))


def check_unit_names(names: Iterable[str]) -> None:
    """Refuses units that would write over each other or outside the output.

    Raises:
        ValueError: two units share a name (input shards share a file name), or a name is
            not a safe relative path.
    """
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
    rel: Callable[[K], str] = record_rel,  # type: ignore[assignment]
) -> dict[K, Record]:
    """Completion records of `units` (key -> unit; the record of key `k` at `rel(k)` below
    `loc`) in one batched read.

    A record that is missing, torn, not a JSON object or not `matches(unit, record)` is left
    out: its unit is redone.
    """
    keys = {str(key): key for key in units}
    found = read_json_objects(loc, {name: rel(key) for name, key in keys.items()})
    return {
        keys[name]: record for name, record in found.items() if matches(units[keys[name]], record)
    }


def keep_intact(out: StageOutput, records: Mapping[K, Record]) -> dict[K, Record]:
    """The records whose listed files are all still there with their recorded sizes (one
    listing); a record whose files vanished, changed or were cut short is redone."""
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
    rel: Callable[[K], str] = record_rel,  # type: ignore[assignment]
) -> dict[K, Record]:
    """Which units an earlier attempt finished: records that match their unit and whose files
    are intact (`read_records`, `keep_intact`); nothing unless the output is being resumed."""
    if out.state is not StageState.RESUME:
        return {}
    return keep_intact(out, read_records(out.location, units, matches, rel))


def run_tasks(
    items: Sequence[Mapping[str, Any]],
    fn: Callable[..., Any],
    *,
    num_cpus: float,
    fn_kwargs: Mapping[str, Any],
) -> Iterator[dict[str, Any]]:
    """One Ray Data task per item (`map_batches(fn, batch_size=1)`); yields `fn`'s rows as
    they come back. Nothing starts when `items` is empty."""
    if not items:
        return
    import ray

    ds = ray.data.from_items(list(items), override_num_blocks=len(items)).map_batches(
        fn, batch_size=1, num_cpus=num_cpus, fn_kwargs=dict(fn_kwargs)
    )
    yield from ds.iter_rows()


def reason_kind(reason: str, *, drop_parenthesis: bool = False) -> str:
    """The kind of a quarantine reason: the text before its first ":" (and, for ingest's
    reasons, before a " (" detail), counted in the manifest's `quarantine_reasons`."""
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


def error_gate(
    stage: str,
    tally: Tally,
    total: int,
    max_error_fraction: float,
    output_loc: Location,
    report: Callable[[str], Any],
) -> str | None:
    """The failure message (also reported, credentials redacted) when more than
    `max_error_fraction` of `total` rows were quarantined, else None; on failure the stage
    keeps its outputs and writes no `_SUCCESS`, so a run with a higher limit resumes them."""
    fraction = tally.quarantined / total if total else 0.0
    if fraction <= max_error_fraction:
        return None
    message = (
        f"{tally.quarantined} of {total} rows quarantined ({fraction:.1%} > max_error_fraction "
        f"{max_error_fraction:.1%}): {tally.summary()}; see {output_loc.child('quarantine').uri} "
        "(outputs kept, no _SUCCESS written)"
    )
    report(f"{stage}: FAILED: {redact(message)}")
    return message


def already_done(out: StageOutput, report: Callable[[str], Any]) -> dict[str, Any]:
    """Reports that a complete output with this fingerprint exists; the stage result's
    `output_uri`, `counts`, `metrics`, `ok`, `message` and `skipped` fields from its manifest."""
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
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.1f}"
