"""An ingest chunk as part tasks: what it writes does not depend on how it was split."""

from __future__ import annotations

from dataclasses import asdict

from pipelines.ingest import IngestConfig
from pipelines.ingest.chunks import chunk_entries, finish_chunk, ingest_part, process_chunk
from pipelines.ingest.listing import enumerate_inputs
from pipelines.io.storage import resolve
from tests.pipelines.ingest.test_stage import SPLITS, _dataset


def test_what_a_chunk_writes_does_not_depend_on_its_parts(tmp_path) -> None:
    _dataset(str(tmp_path / "data"))  # with one planted bad row of each kind
    input_loc = resolve(str(tmp_path / "data"))
    config = IngestConfig(splits=SPLITS, rows_per_group=3)
    found = enumerate_inputs(input_loc, config)
    (entries, *_) = chunk_entries(found.entries, 9)
    unit = {"chunk": 0, "rows": len(entries), "entries": [asdict(e) for e in entries]}
    space = dict(class_names=list(found.space.class_names), space_name=found.space.name)
    kwargs = dict(input_loc=input_loc, config=config, **space)
    whole = process_chunk(unit, output_loc=resolve(str(tmp_path / "one")), **kwargs)
    parts = [ingest_part(unit, a, b, **kwargs) for a, b in [(0, 2), (2, 3), (3, len(entries))]]
    split = finish_chunk(unit, *parts, output_loc=resolve(str(tmp_path / "three")), config=config)
    assert whole["quarantined"] > 0 and whole["output"] > 0
    for key in ("input_rows", "output", "quarantined", "reasons", "files"):
        assert split[key] == whole[key], key
    for entry in whole["files"]:
        one = (tmp_path / "one" / entry["path"]).read_bytes()
        assert (tmp_path / "three" / entry["path"]).read_bytes() == one, entry["path"]
