"""Faults injected into a running refine stage: a Ray worker killed, the object store
restarted, the driver killed and the command run again, a second driver on the same output.

Every case checks that the fault really landed mid-stage (units left to do at that moment);
a fault that arrives after the stage ended fails the test instead of passing silently.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines.io import schema
from pipelines.io.lease import LEASE
from pipelines.io.manifest import StageConflictError, read_manifest
from pipelines.io.storage import Location, resolve
from pipelines.refine import RefineConfig, run_refine
from tests.pipelines.refine.test_stage import synthetic_row, write_ingest_output
from tests.reliability import fault_tools as ft

pytestmark = pytest.mark.slow

NUM_UNITS = 16  # one unit per row: 16 tasks
HEIGHT, WIDTH = 96, 128


@pytest.fixture(scope="module")
def ingest_rows() -> list[dict[str, Any]]:
    return [synthetic_row(i, height=HEIGHT, width=WIDTH) for i in range(NUM_UNITS)]


@pytest.fixture(scope="module")
def local_ingest(tmp_path_factory: pytest.TempPathFactory, ingest_rows: list[dict]) -> Location:
    loc = resolve(str(tmp_path_factory.mktemp("fault_refine") / "ingest"))
    write_ingest_output(loc, ingest_rows, rows_per_shard=8, rows_per_group=1)
    return loc


def _records(unit_dir: Path) -> list[str]:
    """Names of the completion records on disk (hidden temporary files excluded)."""
    if not unit_dir.exists():
        return []
    return sorted(p.name for p in unit_dir.glob("*.json"))


def check_refine_output(out: Location, expected_ids: list[str]) -> dict[str, int]:
    """Every image exactly once; the manifest lists exactly the complete files it names.

    Returns counts for the record: listed files, rows.
    """
    manifest = read_manifest(out)
    assert manifest.stage == "refine"
    assert manifest.counts == {"input": len(expected_ids), "output": len(expected_ids)} | {
        "quarantined": 0
    }
    ids: list[str] = []
    for entry in manifest.files:
        name = entry.path.rsplit("/", 1)[-1]
        assert not name.startswith(".") and ".tmp" not in name, f"temporary file listed: {entry}"
        path = out.join(entry.path)
        assert out.fs.size(path) == entry.bytes, f"{entry.path}: size differs from manifest"
        with out.fs.open(path, "rb") as f:
            table = pq.read_table(f)  # a torn file fails here
        assert table.num_rows == entry.rows
        ids.extend(table.column(schema.IMAGE_ID).to_pylist())
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    assert not repeated, f"rows appear twice: {repeated}"
    assert sorted(ids) == sorted(expected_ids)
    # Nothing under shards/ that the manifest leaves out (a reader could mistake it).
    listed = {e.path for e in manifest.files}
    on_storage = {p[len(out.path) + 1 :] for p in out.fs.find(out.join("shards")) if not _hidden(p)}
    assert on_storage <= listed, f"unlisted shards: {sorted(on_storage - listed)}"
    return {"files": len(manifest.files), "rows": len(ids)}


def _hidden(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(".")


# ---------------------------------------------------------------------------------------------
# A Ray worker killed while it runs a refine task


def test_refine_survives_worker_killed_mid_task(
    ray_session: None, local_ingest: Location, ingest_rows: list[dict], tmp_path: Path, reliability
) -> None:
    reliability.case(
        kind="fault",
        name="refine: Ray worker process killed mid-task",
        injected=(
            "SIGKILL to the pid of a Ray worker whose process title is "
            "`ray::refine_part` (found among this session's Ray processes) once "
            f"2 of {NUM_UNITS} units had completion records"
        ),
        checked=(
            "the stage completes (Ray retries the lost part task); every image exactly once in "
            "the shards; every manifest entry exists with its listed size and row count; no "
            "temporary file listed; units were still pending when the kill landed"
        ),
    )
    output = tmp_path / "refine"
    units = output / "_units"
    injector = ft.FaultInjector(
        ready=lambda: len(_records(units)) >= 2,
        inject=lambda: ft.kill_first_worker("refine_part"),
        snapshot=lambda: _records(units),
    )
    injector.start()
    lines: list[str] = []
    started = time.monotonic()
    result = run_refine(
        local_ingest.uri, str(output), RefineConfig(rows_per_unit=1), report=lines.append
    )
    seconds = time.monotonic() - started
    injection = injector.stop()
    assert injection.error is None, injection.error
    assert injector.injected.is_set(), f"no refine worker was killed: {injection.notes}"
    done_at_kill = len(injection.snapshot)
    reliability.observe(
        f"killed {injection.target} at {injection.at_s:.1f} s, with {done_at_kill} of "
        f"{NUM_UNITS} units complete"
    )
    assert done_at_kill < NUM_UNITS, "the kill landed after the stage had finished"
    assert ft.wait_until_gone([injection.pid], timeout_s=10), "the killed worker is still alive"
    assert result.ok and result.units_run == NUM_UNITS
    counts = check_refine_output(resolve(str(output)), [r["image_id"] for r in ingest_rows])
    leftovers = [p.name for p in (output / "shards").iterdir() if p.name.startswith(".")]
    reliability.observe(
        f"stage completed in {seconds:.1f} s: {counts['rows']} rows once each in "
        f"{counts['files']} listed files; {len(leftovers)} hidden temporary file(s) left by "
        "the killed task, none listed"
    )


# ---------------------------------------------------------------------------------------------
# The object store restarted while shards are being written (s3 -> s3)


def test_refine_s3_survives_object_store_restart(
    ray_session: None, s3_server, s3_bucket: str, ingest_rows: list[dict], reliability
) -> None:
    reliability.case(
        kind="fault",
        name="refine s3→s3: object store restarted mid-write",
        injected=(
            "the loopback S3 server (`rclone serve s3`) stopped and started again on the same "
            "port and directory, with a 2 s outage, once the first unit records of the refine "
            "output appeared on the server's disk"
        ),
        checked=(
            "the stage completes (botocore and `storage.retry_io` retries); units were still "
            "pending at the restart and completed after it; every manifest entry exists with "
            "its listed size and row count, no temporary/partial object listed; every object "
            "written before the restart is still there with the same bytes"
        ),
    )
    bucket = s3_bucket.removeprefix("s3://")
    ingest = resolve(f"{s3_bucket}/ingest")
    write_ingest_output(ingest, ingest_rows, rows_per_shard=8, rows_per_group=1)
    out_dir = s3_server.bucket_dir(bucket) / "refine"
    units = out_dir / "_units"

    during_outage: list[int] = []

    def restart() -> tuple[str, None]:
        s3_server.stop()
        time.sleep(2.0)
        during_outage.append(len(_records(units)))
        s3_server.start()
        return "S3 server restarted", None

    injector = ft.FaultInjector(
        ready=lambda: len(_records(units)) >= 2,
        inject=restart,
        snapshot=lambda: (_records(units), ft.file_digests(out_dir)),
    )
    injector.start()
    lines: list[str] = []
    started = time.monotonic()
    result = run_refine(
        ingest.uri, f"{s3_bucket}/refine", RefineConfig(rows_per_unit=1), report=lines.append
    )
    seconds = time.monotonic() - started
    injection = injector.stop()
    assert injection.error is None, injection.error
    assert injector.injected.is_set(), "the server was never restarted"
    done_at_restart, before = injection.snapshot
    reliability.observe(
        f"restart at {injection.at_s:.1f} s with {len(done_at_restart)} of {NUM_UNITS} units "
        f"complete and {len(before)} objects under the output; {during_outage[0]} complete "
        "at the end of the outage"
    )
    assert len(done_at_restart) < NUM_UNITS, "the restart came after the stage had finished"
    assert result.ok, result.message
    out = resolve(f"{s3_bucket}/refine")
    counts = check_refine_output(out, [r["image_id"] for r in ingest_rows])
    after = ft.file_digests(out_dir)
    lost = [p for p in before if p not in after and not _hidden(p)]
    changed = [p for p, (digest, _) in before.items() if p in after and after[p][0] != digest]
    assert not lost, f"objects lost across the restart: {lost}"
    assert not changed, f"objects changed across the restart: {changed}"
    assert len(_records(units)) == NUM_UNITS
    bookkeeping = ("_RUN.json", "manifest.json", "_SUCCESS")
    listed = {e.path for e in read_manifest(out).files}
    stray = [
        p for p in after if p not in listed and p not in bookkeeping and not p.startswith("_units/")
    ]
    reliability.observe(
        f"files on the server's disk that are neither listed nor bookkeeping: {stray or 'none'}"
    )
    reliability.observe(
        f"stage completed in {seconds:.1f} s; {counts['rows']} rows once each in "
        f"{counts['files']} listed objects; {len(before)} objects written before the restart "
        f"all present with the same bytes; {NUM_UNITS - len(done_at_restart)} units completed "
        "after it"
    )


# ---------------------------------------------------------------------------------------------
# The driver killed mid-stage, then the same command run again


def test_refine_driver_killed_then_rerun(
    local_ingest: Location, ingest_rows: list[dict], tmp_path: Path, reliability
) -> None:
    reliability.case(
        kind="fault",
        name="refine: driver killed mid-stage, same command re-run",
        injected=(
            "`python -m jobs.refine --ray-address local ...` run as a subprocess with its own "
            "Ray instance; SIGKILL to its whole process group once 3 units had completion "
            "records; any process it had started still alive 10 s later (found by an "
            "environment tag) killed by pid"
        ),
        checked=(
            "the kill landed mid-stage; no process of the killed job outlives the test; a "
            "re-run with a changed recipe is refused (StageConflictError) and leaves the "
            "directory untouched; the same command then completes, resuming exactly the "
            "units with intact records (their shard bytes and mtimes unchanged, not "
            "recomputed) and redoing one whose shard was then cut in half; every image once; "
            "no torn or temporary file listed"
        ),
    )
    output = tmp_path / "refine"
    units = output / "_units"
    argv = ["jobs.refine", "--input", local_ingest.uri, "--output", str(output)]
    argv += ["--ray-address", "local", "--num-cpus-per-task", "1", "--rows-per-unit", "1"]
    killed = ft.run_job_then_kill(argv, ready=lambda: len(_records(units)) >= 3)
    assert not (output / "_SUCCESS").exists(), "the kill came after the stage had finished"
    assert (output / LEASE).exists()  # the dead driver's: taken over at once below (same host)
    after_kill = ft.file_digests(output)
    done = _records(units)
    assert 3 <= len(done) < NUM_UNITS, done
    reliability.observe(
        f"driver group killed at {killed['killed_at']:.1f} s with {len(done)} of {NUM_UNITS} "
        f"units complete; the job had {killed['processes']} processes: "
        f"{killed['died_with_group']} died with its process group, "
        f"{len(killed['survivors'])} were still alive 10 s later and killed by pid "
        f"({', '.join(killed['survivors']) or 'none'})"
    )
    torn = [p for p in after_kill if _hidden(p)]

    # A changed recipe must not reuse the interrupted run's files.
    with pytest.raises(StageConflictError, match="--overwrite"):
        run_refine(local_ingest.uri, str(output), RefineConfig(bg_threshold=0.3, rows_per_unit=1))
    assert ft.file_digests(output) == after_kill, "a refused run changed the directory"

    # A torn shard of a finished unit (as a store without atomic puts could leave) is redone.
    damaged = done[-1].removesuffix(".json")
    shard = output / "shards" / f"{damaged}.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    kept = done[:-1]

    started = time.monotonic()
    code, printed = ft.run_job(argv)
    assert code == 0, printed[-3000:]
    assert f"resuming: {len(kept)} of {NUM_UNITS} units already done" in printed, printed[-3000:]
    final = ft.file_digests(output)
    assert final[f"shards/{damaged}.parquet"] != after_kill[f"shards/{damaged}.parquet"]
    for name in kept:  # units finished before the kill were kept, not recomputed
        unit = name.removesuffix(".json")
        for rel in (f"_units/{name}", f"shards/{unit}.parquet"):
            assert final.get(rel) == after_kill[rel], f"{rel} was rewritten by the re-run"
    counts = check_refine_output(resolve(str(output)), [r["image_id"] for r in ingest_rows])
    reliability.observe(
        f"re-run completed in {time.monotonic() - started:.1f} s, resuming {len(kept)} units "
        f"(bytes and mtimes unchanged) and running {NUM_UNITS - len(kept)} (the one whose "
        f"shard was cut in half included); {counts['rows']} rows once each; {len(torn)} "
        "temporary file(s) left by the kill, none listed"
    )
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["units"] == NUM_UNITS


# ---------------------------------------------------------------------------------------------
# Two drivers started at once on one output


def test_refine_two_concurrent_drivers_exactly_one_commits(
    local_ingest: Location, tmp_path: Path, reliability
) -> None:
    import ray

    reliability.case(
        kind="fault",
        name="refine: two drivers started at once on one output",
        injected=(
            "two `python -m jobs.refine` subprocesses with the same arguments started together, "
            "attached to the session's Ray instance, then a third alone into another directory"
        ),
        checked=(
            "exactly one exits 0 having done the work, the other exits 1 with the holder named "
            "(`is in use by a refine run`); the committed output lists the same files as the "
            "solo run, every one byte-identical; the lease is gone after the commit"
        ),
    )
    argv = ["jobs.refine", "--input", local_ingest.uri, "--num-cpus-per-task", "0.5"]
    argv += ["--rows-per-unit", "1"]
    argv += ["--ray-address", ray.get_runtime_context().gcs_address]
    shared, solo = tmp_path / "shared", tmp_path / "solo"
    started = time.monotonic()
    tags = [ft.new_tag() for _ in range(2)]
    both = [
        subprocess.Popen(
            [sys.executable, "-m", *argv, "--output", str(shared)],
            cwd=ft.REPO,
            env=ft.job_env(tag),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for tag in tags
    ]
    try:
        done = [(*process.communicate(timeout=600), process.returncode) for process in both]
    finally:
        for process in both:
            if process.poll() is None:
                process.kill()
        assert sum(ft.kill_tagged(tag) for tag in tags) == 0, "a driver left processes behind"
    seconds = time.monotonic() - started
    assert sorted(code for _, _, code in done) == [0, 1], done
    ((_, err, _),) = [d for d in done if d[2] == 1]
    refusal = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "is in use by a refine run" in refusal, err
    ((out, _, _),) = [d for d in done if d[2] == 0]
    assert "nothing to do" not in out  # the winner did the work; the loser touched nothing
    code, printed = ft.run_job([*argv, "--output", str(solo)])
    assert code == 0, printed[-3000:]
    manifests = read_manifest(str(shared)), read_manifest(str(solo))
    assert [f.path for f in manifests[0].files] == [f.path for f in manifests[1].files]
    for entry in manifests[0].files:
        assert (shared / entry.path).read_bytes() == (solo / entry.path).read_bytes(), entry.path
    assert manifests[0].counts == manifests[1].counts and not (shared / LEASE).exists()
    reliability.observe(
        f"both drivers finished in {seconds:.1f} s; the refused one said: "
        f"{refusal.split(' (--debug')[0].replace(str(shared), '<output>')}"
    )
    reliability.observe(f"{len(manifests[0].files)} listed files byte-identical to the solo run's")
