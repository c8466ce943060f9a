"""Fault-injection helpers for tests/reliability/test_faults_*.py: find and kill processes.

Only processes this test session started are ever touched: Ray workers are found among the
descendants of the pytest process (a local Ray instance's raylet is its child), and the Ray
processes of a job run as a subprocess are found by a unique tag put into that subprocess's
environment (every Ray process it starts inherits it). Nothing here matches processes by name
machine-wide. Linux only (/proc).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.io.lease import LEASE
from tests.proc import run_logged, tail

TAG_ENV = "WEAKCLIP_FAULT_TEST_TAG"
REPO = Path(__file__).resolve().parents[2]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: fields start after the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendant_pids(root: int) -> list[int]:
    """Every live descendant of `root` (children, grandchildren, ...)."""
    children = _children_map()
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def process_title(pid: int) -> str:
    """The command line (Ray workers put `ray::<task or actor.method>` there), or ""."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def ray_workers(prefix: str, *, root: int | None = None) -> list[tuple[int, str]]:
    """(pid, title) of Ray worker processes below `root` (default: this process) whose title
    starts with `ray::<prefix>`.

    Processes forked by a worker (a training worker's CRF pool) carry its title too; they are
    left out: their parent has the same title.
    """
    wanted = f"ray::{prefix}"
    found = []
    for pid in descendant_pids(os.getpid() if root is None else root):
        title = process_title(pid)
        if not title.startswith(wanted):
            continue
        parent = parent_pid(pid)
        if parent is not None and process_title(parent).startswith(wanted):
            continue
        found.append((pid, title))
    return found


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment holds `TAG_ENV=tag` (what one subprocess started)."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or another user's process
            continue
        if needle in environ.split(b"\0") and is_alive(int(entry)):
            found.append(int(entry))
    return found


def kill_tagged(tag: str, *, timeout_s: float = 30.0) -> int:
    """SIGKILL every process carrying `tag` until none is left; returns how many were killed.

    Raises:
        AssertionError: some are still alive after `timeout_s`.
    """
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        alive = tagged_pids(tag)
        if not alive:
            return len(killed)
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of tag {tag} still alive: {alive}")
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def wait_until_gone(pids: Iterable[int], *, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if is_alive(p)]
        if pending:
            time.sleep(0.05)
    return not pending


def file_digests(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path → (sha256, mtime_ns) of every file below `root`, but the output lease
    (`_LEASE.json`: who is running, not output; a refused run may take over a dead one)."""
    digests = {}
    if not root.exists():
        return digests
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(LEASE):
            try:
                data = path.read_bytes()
                mtime = path.stat().st_mtime_ns
            except OSError:  # renamed or removed meanwhile
                continue
            digests[str(path.relative_to(root))] = (hashlib.sha256(data).hexdigest(), mtime)
    return digests


@dataclass
class Injection:
    """What a `FaultInjector` did: when, to what, and the state it saw at that moment."""

    target: str = ""  # e.g. "pid 1234 (ray::refine_part)"
    pid: int | None = None
    at_s: float | None = None  # seconds after the injector started
    at_wall: datetime.datetime | None = None  # local wall-clock time right after injecting
    snapshot: Any = None  # what `snapshot()` returned right before the injection
    error: BaseException | None = None
    notes: list[str] = field(default_factory=list)


class FaultInjector(threading.Thread):
    """Polls `ready()` in the background; once true, calls `inject()` once.

    `inject()` returns a description and, optionally, the pid it acted on (or None to keep
    polling, e.g. when no matching process exists right now). `snapshot()` is called right
    before `inject()` and its result kept, so a test can prove the fault landed mid-stage.
    """

    def __init__(
        self,
        *,
        ready: Callable[[], bool],
        inject: Callable[[], tuple[str, int | None] | None],
        snapshot: Callable[[], Any] = lambda: None,
        poll_s: float = 0.01,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(daemon=True, name="fault-injector")
        self._ready = ready
        self._inject = inject
        self._snapshot = snapshot
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self._stop_event = threading.Event()
        self.result = Injection()
        self.injected = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self._stop_event.is_set():
                if time.monotonic() - started > self._timeout_s:
                    self.result.notes.append(f"gave up after {self._timeout_s} s")
                    return
                if self._ready():
                    snapshot = self._snapshot()
                    done = self._inject()
                    if done is not None:
                        self.result.at_wall = datetime.datetime.now()
                        self.result.target, self.result.pid = done
                        self.result.snapshot = snapshot
                        self.result.at_s = time.monotonic() - started
                        self.injected.set()
                        return
                time.sleep(self._poll_s)
        except BaseException as exc:  # surfaced by the test through `result.error`
            self.result.error = exc

    def stop(self) -> Injection:
        self._stop_event.set()
        self.join(timeout=30)
        return self.result


def kill_first_worker(prefix: str) -> tuple[str, int] | None:
    """SIGKILL one Ray worker of this session whose title starts with `ray::<prefix>`."""
    for pid, title in ray_workers(prefix):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        return f"pid {pid} ({title})", pid
    return None


# ---------------------------------------------------------------------------------------------
# A job run as a subprocess with its own local Ray instance


def job_env(tag: str) -> dict[str, str]:
    """The job's environment: this one (test S3 settings) without RAY_ADDRESS, plus a tag."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[TAG_ENV] = tag
    env["PYTHONPATH"] = str(REPO)
    return env


def run_job_then_kill(
    argv: list[str], *, ready: Callable[[], bool], timeout_s: float = 240.0, grace_s: float = 10.0
) -> dict[str, Any]:
    """Starts `python -m <argv>` in its own session, SIGKILLs its process group once `ready()`,
    waits `grace_s` for the rest to exit, then SIGKILLs every process it started that is still
    there (found by tag). Returns what happened.

    Raises:
        AssertionError: the job ended before `ready()` held (the kill would not be mid-stage).
    """
    tag = new_tag()
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env=job_env(tag),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while not ready():
                if proc.poll() is not None:
                    log.seek(0)
                    output = log.read().decode(errors="replace")
                    raise AssertionError(
                        f"the job ended (rc {proc.returncode}) before the kill:\n{tail(output)}"
                    )
                if time.monotonic() - started > timeout_s:
                    log.seek(0)
                    raise AssertionError(
                        f"the job never reached the kill point in {timeout_s:.0f} s; the last "
                        f"of its output:\n{tail(log.read())}"
                    )
                time.sleep(0.02)
            before_kill = tagged_pids(tag)
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic() - started
            proc.wait(timeout=30)
            in_group = len(before_kill) - len(tagged_pids(tag))
            # Ray's own processes notice a dead driver and exit; give them a moment.
            deadline = time.monotonic() + grace_s
            while tagged_pids(tag) and time.monotonic() < deadline:
                time.sleep(0.2)
            survivors = [process_title(p)[:60] for p in tagged_pids(tag)]
        finally:
            # Whatever happened above: nothing this job started may outlive the test.
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            extra_killed = kill_tagged(tag)
    return {
        "killed_at": killed_at,
        "processes": len(before_kill),
        "died_with_group": in_group,
        "survivors": survivors,  # titles of those still alive `grace_s` after the kill
        "killed_after": extra_killed,
    }


def run_job(argv: list[str], *, timeout_s: float = 300.0, grace_s: float = 15.0) -> tuple[int, str]:
    """Runs `python -m <argv>` to the end; returns (exit status, stdout + stderr).

    Raises:
        AssertionError: a process the job started was still running `grace_s` after it
            exited (it is killed first), or the job outran `timeout_s` (its output's tail is
            in the message).
    """
    tag = new_tag()
    try:
        done = run_logged(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env=job_env(tag),
            timeout_s=timeout_s,
            what=f"python -m {argv[0]}",
        )
    finally:
        deadline = time.monotonic() + grace_s
        while tagged_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = kill_tagged(tag)
    assert leftover == 0, f"{leftover} processes of a finished job were still running"
    return done.returncode, done.stdout
