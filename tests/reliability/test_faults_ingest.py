"""Faults injected into a running ingest stage: the driver killed, then the same command re-run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.ingest import IngestConfig, run_ingest
from pipelines.io import schema
from pipelines.io.manifest import StageConflictError, read_manifest
from pipelines.io.storage import resolve
from pipelines.synthetic.dataset import write_dataset
from tests.reliability import fault_tools as ft

pytestmark = pytest.mark.slow

NUM_IMAGES = 48
ROWS_PER_SHARD = 3  # 16 chunks, one task each
NUM_CHUNKS = NUM_IMAGES // ROWS_PER_SHARD


def _records(chunk_dir: Path) -> list[str]:
    return sorted(p.name for p in chunk_dir.glob("*.json")) if chunk_dir.exists() else []


def test_ingest_driver_killed_then_rerun(tmp_path: Path, reliability) -> None:
    reliability.case(
        kind="fault",
        name="ingest: driver killed mid-stage, same command re-run",
        injected=(
            "`python -m jobs.ingest --ray-address local ...` run as a subprocess with its own "
            f"Ray instance ({NUM_CHUNKS} chunks); SIGKILL to its whole process group once 2 "
            "chunks had completion records; any process it had started still alive 10 s "
            "later killed by pid"
        ),
        checked=(
            "the kill landed mid-stage; no process of the killed job outlives the test; a "
            "re-run with another chunking is refused and leaves the directory untouched; the "
            "same command then completes, resuming exactly the chunks with intact records "
            "(their shards unchanged) and redoing one whose shard was then cut in half; every "
            "image once; no torn or temporary file listed"
        ),
    )
    data = tmp_path / "data"
    loc = resolve(str(data))
    written = write_dataset(
        loc.fs, loc.path, num_images=NUM_IMAGES, seed=5, height=96, width=128, workers=1
    )
    expected = sorted(written.train_ids + written.val_ids)
    output = tmp_path / "ingest"
    chunks = output / "_chunks"
    argv = ["jobs.ingest", "--input", str(data), "--output", str(output)]
    argv += ["--rows-per-shard", str(ROWS_PER_SHARD), "--num-cpus-per-task", "1"]
    argv += ["--ray-address", "local"]
    killed = ft.run_job_then_kill(argv, ready=lambda: len(_records(chunks)) >= 2)
    assert not (output / "_SUCCESS").exists(), "the kill came after the stage had finished"
    after_kill = ft.file_digests(output)
    done = _records(chunks)
    assert 2 <= len(done) < NUM_CHUNKS, done
    reliability.observe(
        f"driver group killed at {killed['killed_at']:.1f} s with {len(done)} of {NUM_CHUNKS} "
        f"chunks complete; the job had {killed['processes']} processes: "
        f"{killed['died_with_group']} died with its process group, "
        f"{len(killed['survivors'])} were still alive 10 s later and killed by pid "
        f"({', '.join(killed['survivors']) or 'none'})"
    )

    with pytest.raises(StageConflictError, match="--overwrite"):
        run_ingest(str(data), str(output), IngestConfig(rows_per_shard=ROWS_PER_SHARD + 1))
    assert ft.file_digests(output) == after_kill, "a refused run changed the directory"

    # A torn shard of a finished chunk (as a store without atomic puts could leave) is redone.
    damaged = done[-1].removesuffix(".json")
    shard = output / "shards" / f"{damaged}.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    kept = done[:-1]

    code, printed = ft.run_job(argv)
    assert code == 0, printed[-3000:]
    resumed = f"resuming: {len(kept)} of {NUM_CHUNKS} chunks already written"
    assert resumed in printed, printed[-3000:]
    final = ft.file_digests(output)
    assert final[f"shards/{damaged}.parquet"] != after_kill[f"shards/{damaged}.parquet"]
    for name in kept:
        chunk = name.removesuffix(".json")
        for rel in (f"_chunks/{name}", f"shards/{chunk}.parquet"):
            assert final.get(rel) == after_kill[rel], f"{rel} was rewritten by the re-run"

    manifest = read_manifest(str(output))
    assert manifest.counts == {"input": NUM_IMAGES, "output": NUM_IMAGES, "quarantined": 0}
    ids: list[str] = []
    for entry in manifest.files:
        name = entry.path.rsplit("/", 1)[-1]
        assert not name.startswith(".") and ".tmp" not in name, f"temporary file listed: {entry}"
        path = output / entry.path
        assert path.stat().st_size == entry.bytes
        table = pq.read_table(path)
        assert table.num_rows == entry.rows
        ids.extend(table.column(schema.IMAGE_ID).to_pylist())
    assert not [i for i, n in Counter(ids).items() if n > 1], "a row appears twice"
    assert sorted(ids) == expected
    torn = [p for p in after_kill if p.rsplit("/", 1)[-1].startswith(".")]
    reliability.observe(
        f"re-run resumed {len(kept)} chunks (unchanged) and wrote {NUM_CHUNKS - len(kept)} "
        "(the one whose shard was cut in half included); "
        f"{len(ids)} rows once each in {len(manifest.files)} listed files; {len(torn)} "
        "temporary file(s) left by the kill, none listed"
    )
