"""Weights files a run starts from: digests recorded, remote copies verified before the cache
keeps them (verify, then move)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from pipelines.io.storage import resolve, write_bytes_atomic
from pipelines.training.run import Weights, resolve_weights

CACHE = Path(tempfile.gettempdir()) / "weakclip-weights-cache"


def test_no_uri_is_random_initialisation() -> None:
    assert resolve_weights(None, None) == Weights() and Weights().fetch("weights") is None


def test_local_file_is_used_in_place_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights v1")
    weights = resolve_weights(str(path), None)
    assert weights.sha256 == hashlib.sha256(b"weights v1").hexdigest()
    assert weights.fetch("weights") == str(path)
    path.write_bytes(b"weights v2")
    with pytest.raises(ValueError, match="changed since the run started"):
        weights.fetch("weights")


def test_a_remote_file_that_changed_never_enters_the_cache(s3_bucket: str) -> None:
    loc = resolve(s3_bucket)
    name = f"w-{os.getpid()}-{id(loc)}.pt"
    write_bytes_atomic(loc, name, b"remote v1")
    weights = resolve_weights(loc.child(name).uri, None)
    cached = CACHE / f"{weights.sha256}.pt"
    cached.unlink(missing_ok=True)
    write_bytes_atomic(loc, name, b"remote v2: replaced after the run started")
    with pytest.raises(ValueError, match="changed since the run started"):
        weights.fetch("weights")
    assert not cached.exists()  # not moved in unverified
    assert not list(CACHE.glob(f"{weights.sha256}*"))  # nor a partial download left
    write_bytes_atomic(loc, name, b"remote v1")
    assert Path(weights.fetch("weights")).read_bytes() == b"remote v1"
    assert weights.fetch("weights") == str(cached)  # from the cache, checked again
    cached.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="changed"):
        weights.fetch("weights")
    cached.unlink()
