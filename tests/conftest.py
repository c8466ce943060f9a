"""Shared fixtures: one local Ray instance per test session (Ray's `ray_start_regular_shared`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A private local Ray instance with 2 CPUs, shared by every test that needs Ray.

    `address="local"` never attaches to a `ray start --head` cluster left on the machine.
    Jobs called through `main([...])` see `ray.is_initialized()` and reuse this instance.
    """
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
