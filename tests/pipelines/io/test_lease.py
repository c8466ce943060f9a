"""The output lease: a live run's output is refused to a second driver, untouched; a dead
holder's (crashed, or silent for the TTL) is taken over by the same command; a holder that
lost its lease cannot commit. Local and on the loopback S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.io import lease as lease_module
from pipelines.io.lease import LEASE, TTL_S, Holder, Lease, OutputBusyError
from pipelines.io.manifest import StageOutput, StageState, write_parquet
from pipelines.io.storage import Location, read_bytes, resolve, write_bytes_atomic
from tests.pipelines.io.test_manifest import CONFIG, INPUTS, TABLE, _commit

HOLD = """
import sys, time
from pipelines.io.lease import Lease
from pipelines.io.storage import resolve
Lease.acquire(resolve(sys.argv[1]), stage="refine")
print("held", flush=True)
time.sleep(600)
"""


def _open(loc: Location) -> StageOutput:
    return StageOutput.open(loc, stage="refine", config=CONFIG, inputs=INPUTS)


def _other_host(loc: Location, *, renewed: float) -> None:
    """A lease file as a driver on another machine writes it."""
    holder = Holder("f" * 32, "refine", "elsewhere.example", 4242, renewed)
    write_bytes_atomic(loc, LEASE, holder.to_bytes())


def _listing(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_a_live_run_is_refused_untouched_and_a_crashed_one_resumes(tmp_path: Path) -> None:
    loc = resolve(str(tmp_path / "out"))
    first = _open(loc)  # an interrupted run: the run record, one shard
    write_parquet(loc, "shards/part-00000.parquet", TABLE)
    first.lease.release()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, loc.uri], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _listing(tmp_path / "out")
        busy = rf"in use by a refine run on .* \(pid {holder.pid}"
        with pytest.raises(OutputBusyError, match=busy):
            _open(loc)
        with pytest.raises(OutputBusyError):  # --overwrite does not break a live lease either
            StageOutput.open(loc, stage="refine", config={"x": 1}, inputs=INPUTS, overwrite=True)
        assert _listing(tmp_path / "out") == before  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    # The holder died on this host: the same command resumes at once, no --overwrite needed.
    started = time.monotonic()
    again = _open(loc)
    assert again.state is StageState.RESUME and time.monotonic() - started < 5
    _commit(again, [write_parquet(loc, "shards/part-00000.parquet", TABLE)])
    assert not (tmp_path / "out" / LEASE).exists()  # released at the commit


def test_another_hosts_lease_holds_until_its_ttl_passes(tmp_path: Path) -> None:
    loc = resolve(str(tmp_path / "out"))
    _other_host(loc, renewed=time.time() - 2)
    with pytest.raises(OutputBusyError, match=r"elsewhere.example .*run the same command again in"):
        _open(loc)
    assert os.listdir(tmp_path / "out") == [LEASE]
    _other_host(loc, renewed=time.time() - TTL_S - 1)  # its holder stopped renewing
    out = _open(loc)
    assert out.state is StageState.FRESH
    assert json.loads((tmp_path / "out" / LEASE).read_text())["pid"] == os.getpid()


def test_the_holder_renews_and_a_lost_lease_cannot_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_module, "RENEW_S", 0.05)
    loc = resolve(str(tmp_path / "out"))
    out = _open(loc)
    first = json.loads((tmp_path / "out" / LEASE).read_text())["renewed"]
    time.sleep(0.5)
    assert json.loads((tmp_path / "out" / LEASE).read_text())["renewed"] > first
    entry = write_parquet(loc, "shards/part-00000.parquet", TABLE)
    _other_host(loc, renewed=time.time())  # e.g. our renewals stalled and it took over
    time.sleep(0.5)
    with pytest.raises(OutputBusyError, match="taken over: a refine run on elsewhere.example"):
        _commit(out, [entry])
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert "elsewhere.example" in (tmp_path / "out" / LEASE).read_text()  # theirs, kept


def test_an_exclusive_create_loses_to_the_first_writer(tmp_path: Path) -> None:
    loc = resolve(str(tmp_path / "out"))
    me = Holder("a" * 32, "refine", "elsewhere.example", 1, time.time())
    assert lease_module._write_new(loc, me, replacing=False, etag=None)
    assert not lease_module._write_new(loc, me, replacing=False, etag=None)
    assert sorted(os.listdir(tmp_path / "out")) == [LEASE]  # no temporary file left


def test_lease_on_s3(s3_bucket: str) -> None:
    loc = resolve(s3_bucket).child("leased")
    out = _open(loc)
    assert Holder.parse(read_bytes(loc, LEASE)).pid == os.getpid()
    _commit(out, [write_parquet(loc, "shards/part-00000.parquet", TABLE)])
    assert not loc.fs.exists(loc.join(LEASE))
    other = resolve(s3_bucket).child("busy")
    _other_host(other, renewed=time.time())
    with pytest.raises(OutputBusyError):
        _open(other)
    assert loc.fs.ls(other.path, detail=False) == [other.join(LEASE)]
    _other_host(other, renewed=time.time() - TTL_S - 1)
    taken = Lease.acquire(other, stage="refine")
    assert Holder.parse(read_bytes(other, LEASE)).holder == taken.holder.holder
    taken.release()
    assert not other.fs.exists(other.join(LEASE))
