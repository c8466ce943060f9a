"""Shared fixtures: one local Ray instance per test session (Ray's `ray_start_regular_shared`)
and one loopback S3 server (`rclone serve s3`) per session.

Object-storage settings for the whole test session are put into `os.environ` when pytest
starts (`pytest_configure`), before any fixture can start Ray: the Ray workers of
`ray_session` then inherit the test credentials and endpoint whichever fixture runs first.
The same settings keep every test away from real AWS: fixed fake credentials, the endpoint on
127.0.0.1, no profile or config files, no instance-metadata lookups.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3server import S3Server, free_port

S3_ACCESS_KEY = "weakclip-test-access"
S3_SECRET_KEY = "weakclip-test-secret-key"
_S3_PORT = free_port()
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_S3_PORT}",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_S3_ENV_REMOVED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")
_saved_env: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    for name in (*_S3_ENV, *_S3_ENV_REMOVED, "NO_PROXY", "no_proxy"):
        _saved_env[name] = os.environ.get(name)
    for name in _S3_ENV_REMOVED:
        os.environ.pop(name, None)
    os.environ.update(_S3_ENV)
    for name in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(name)
        os.environ[name] = f"{current},127.0.0.1,localhost" if current else "127.0.0.1,localhost"


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A loopback S3 server (`rclone serve s3`) for the session, at `AWS_ENDPOINT_URL`.

    Objects live as files under `s3_server.root / <bucket>`; `restart()` keeps them.
    """
    server = S3Server(
        tmp_path_factory.mktemp("s3"),
        port=_S3_PORT,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh empty bucket on the loopback server: `s3://test-<uuid>`."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    from pipelines.io.storage import resolve

    loc = resolve(f"s3://{bucket}")
    loc.fs.mkdir(bucket)  # CreateBucket through the S3 API
    return loc.uri


# The demo's settings, smaller still: 8 images, a few iterations per training stage.
SMALL_DEMO = {
    "iterations": 4,
    "checkpoint_every": 2,
    "log_every": 2,
    "pseudo_masks": {"scales": [1.0], "flip": False, "report_images": 2},
    "retrain": {"iterations": 4, "batch_size": 4, "crop_size": 96, "short_side": 96},
}


@dataclass(frozen=True)
class DemoChain:
    """One run of the README's main job on a very small demo (`SMALL_DEMO`)."""

    output: Path  # the run's --output
    args: tuple[str, ...]  # the job's arguments (re-run them to resume)
    config: Path  # the --config file (SMALL_DEMO as JSON)
    printed: str  # what the first run printed


@pytest.fixture(scope="session")
def demo_chain(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> DemoChain:
    """`python -m jobs.pipeline --demo --num-images 8` with `SMALL_DEMO`, once per session
    (the pipeline test and the report's browser test read the same run)."""
    from jobs.pipeline import main as pipeline

    root = tmp_path_factory.mktemp("demo-chain")
    out, config = root / "demo", root / "small.json"
    config.write_text(json.dumps(SMALL_DEMO))
    args = ("--demo", "--num-images", "8", "--output", str(out), "--config", str(config))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert pipeline(list(args)) == 0
    return DemoChain(output=out, args=args, config=config, printed=printed.getvalue())
