"""Connecting a job to Ray, and refusing a node-local output on a multi-node cluster."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pipelines.cli.options import UsageError, resolve_arg, storage_options
from pipelines.io.storage import Location


def alive_node_count() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def use_gpu(requested: bool | None) -> bool:
    """`requested`, or (None) whether the connected Ray cluster has GPUs."""
    import ray

    return requested if requested is not None else float(ray.cluster_resources().get("GPU", 0)) > 0


AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _PrefixFilter(logging.Filter):
    """Drops the records whose message starts with `prefix` and, with `below`, every record
    under that level."""

    def __init__(self, prefix: str, below: int = logging.NOTSET) -> None:
        super().__init__()
        self.prefix, self.below = prefix, below

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.below and not record.getMessage().startswith(self.prefix)


def _add_once(target: logging.Filterer, new: _PrefixFilter) -> None:
    """`new` on `target` unless an equal filter is there already."""
    same = (new.prefix, new.below)
    present = [(f.prefix, f.below) for f in target.filters if isinstance(f, _PrefixFilter)]
    if same not in present:
        target.addFilter(new)


def _drop_record(logger: str, prefix: str) -> None:
    """`logger` (once) without the records that start with `prefix`."""
    _add_once(logging.getLogger(logger), _PrefixFilter(prefix))


def quiet_ray_data_console() -> None:
    """Ray Data's console handler in this process without its no-action lines: records below
    WARNING (a dataset's start, plan and finish: three lines per dataset) and its notice that
    progress bars are off (this module turns them off in logs). The session's `ray-data.log`
    keeps everything; `--debug` leaves the console as Ray set it."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            _add_once(handler, _PrefixFilter("Progress bars disabled", below=logging.WARNING))


QUIET_WORKERS = {"worker_process_setup_hook": f"{__name__}.quiet_ray_data_console"}


def init_ray(args: argparse.Namespace, *, node_count: Callable[[], int] = alive_node_count) -> bool:
    """Connect to Ray, then refuse a node-local `--output` on a multi-node cluster.

    Order: an instance already initialised in this process (tests, chained stages); else
    `--ray-address`; else `$RAY_ADDRESS` (set by `ray job submit`); else a new local instance
    using every core, with the dashboard on 127.0.0.1 (port 8265, or the next free one).
    Workers of a new local instance inherit this process's environment (AWS credentials
    included); workers of an existing cluster use their own AWS credential chain, while the
    endpoint travels inside each `Location`.

    Returns True when this call started or connected Ray.

    Raises:
        UsageError: `--object-store-memory` with an existing cluster, or a local output on a
            multi-node cluster without `--allow-local-output`.
    """
    import ray

    started = False
    if not ray.is_initialized():
        address = getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS")
        object_store = getattr(args, "object_store_memory", None)
        if address:
            if object_store is not None:
                raise UsageError(
                    "--object-store-memory applies to a new local Ray instance, "
                    "not to an existing cluster"
                )
            ray.init(address=address)
        else:
            # With the dashboard: it serves Ray's State API, which Ray Train's placement-group
            # cleaner polls every second (a warning per poll without it), and a progress view.
            # Its workers (Ray Train's data coordinator among them) quiet Ray Data's console
            # too; Ray's notice that it turned token authentication on (the secure default this
            # instance keeps: nothing to do) is left out.
            quiet: dict[str, Any] = {}
            if not getattr(args, "debug", False):
                quiet["runtime_env"] = QUIET_WORKERS
                _drop_record(AUTH_LOGGER, "Token authentication is enabled")
            ray.init(
                address="local",
                object_store_memory=object_store,
                include_dashboard=True,
                **quiet,
            )
        started = True
    if not sys.stdout.isatty():
        # Logs (ray job submit, CI): the stages print their own progress lines; Ray Data's
        # bars would add one redraw line per operator every few seconds from every worker.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    if not getattr(args, "debug", False):
        quiet_ray_data_console()
    output = getattr(args, "output", None)
    if output is not None:
        check_local_output(
            resolve_arg("--output", output, storage_options(args)),
            allow_local_output=bool(getattr(args, "allow_local_output", False)),
            node_count=node_count,
        )
    return started


def check_local_output(
    output: Location, *, allow_local_output: bool, node_count: Callable[[], int]
) -> None:
    """Refuse a `file://`/plain-path output when the cluster has more than one node."""
    if not output.is_local or allow_local_output:
        return
    nodes = node_count()
    if nodes > 1:
        raise UsageError(
            f"--output {output.uri} is a local path, but the Ray cluster has {nodes} nodes: "
            "workers on other nodes would write to their own disks and the output would be "
            "scattered. Use object storage (s3://bucket/prefix), or pass --allow-local-output "
            "if that path is a shared filesystem mounted on every node"
        )
