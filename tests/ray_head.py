"""A private Ray cluster on loopback (`ray start --head`) for tests and benchmarks that submit
jobs with `ray job submit`.

The cluster has its own temp dir, ports and auth token, and is stopped by killing the process
tree `ray start` left behind — never `ray stop`, which would stop every Ray instance on the
machine (a test session's included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.proc import run_logged
from tests.s3server import free_port

RAY = str(Path(sys.executable).parent / "ray")


@dataclass(frozen=True)
class Cluster:
    dashboard: str  # http://127.0.0.1:<port>: `ray job submit --address`
    address: str  # 127.0.0.1:<port>: a driver's `--ray-address`
    env: dict[str, str]  # environment of `ray` CLI calls and drivers (auth token, PATH)
    temp_dir: str


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), read from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (parent, cmdline)
    return table


def _stop_cluster(temp_dir: str) -> None:
    """Kills the processes whose command line names `temp_dir`, and all their descendants."""
    table = _process_table()
    tree = {pid for pid, (_, cmdline) in table.items() if temp_dir in cmdline}
    grown = True
    while grown:
        grown = False
        for pid, (parent, _) in table.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in tree):
            time.sleep(0.2)


@contextmanager
def ray_head(num_cpus: int = 2, object_store_mib: int = 512) -> Iterator[Cluster]:
    """A one-node Ray cluster with `num_cpus` CPUs, stopped (process tree killed) on exit."""
    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="rayE2E-", dir="/tmp")
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",  # Ray 2.60: the head requires this token of every client
        RAY_AUTH_TOKEN_PATH=token_path,
        RAY_USAGE_STATS_ENABLED="0",
    )
    port, dashboard_port = free_port(), free_port()
    try:
        subprocess.run(
            [
                RAY, "start", "--head",
                "--node-ip-address", "127.0.0.1",
                "--port", str(port),
                "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard_port),
                # The agents' default ports are fixed: another Ray instance on this machine
                # (a test session's) may hold them, and the job agent would never start.
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()),
                "--metrics-export-port", str(free_port()),
                "--ray-client-server-port", str(free_port()),
                "--num-cpus", str(num_cpus),
                "--object-store-memory", str(object_store_mib * 1024 * 1024),
                "--temp-dir", temp_dir,
                "--disable-usage-stats",
            ],
            env=env,
            check=True,
            timeout=180,
            capture_output=True,
        )  # fmt: skip
        yield Cluster(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{port}", env, temp_dir)
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(
    cluster: Cluster,
    entrypoint: Sequence[str],
    *,
    working_dir: str | Path,
    timeout_s: float,
    agent_wait_s: float = 180,
) -> subprocess.CompletedProcess[str]:
    """`ray job submit` of `entrypoint` with `working_dir`, its streamed log captured (any exit
    status: the caller asserts on it); past `timeout_s` the submit is killed (AssertionError
    with the log's tail, `tests.proc.run_logged`).

    Right after `ray start` the head's job agent may not be up yet ("No available agent to
    submit job"): that refusal creates no job, so it is submitted again for `agent_wait_s`.
    """
    argv = [RAY, "job", "submit", "--address", cluster.dashboard]
    argv += ["--working-dir", str(working_dir), "--", *entrypoint]
    deadline = time.monotonic() + agent_wait_s
    while True:
        submit = run_logged(argv, env=cluster.env, timeout_s=timeout_s, what="ray job submit")
        if "No available agent" not in submit.stdout:
            return submit
        if time.monotonic() > deadline:
            raise AssertionError("the cluster's job agent never came up")
        time.sleep(5)
