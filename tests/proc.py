"""Subprocesses in tests: a time limit that tells a hang from a slow machine.

`run_logged` is `subprocess.run` with captured text output and a time limit; when the limit
passes, the process group is killed and the test fails with the tail of what the process had
printed (a job's own log), so the report shows where it was, not just "timed out".
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

TAIL_CHARS = 6000  # of a timed-out or failed process's output, in the assertion message


def tail(text: str | bytes | None, chars: int = TAIL_CHARS) -> str:
    """The last `chars` characters of a process's output (bytes decoded leniently)."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-chars:]


def run_logged(
    argv: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs `argv` to the end in its own process group; stdout and stderr are captured.

    Args:
        argv: the command.
        timeout_s: a generous multiple of what the work takes; past it the whole process group
            is killed and the test fails with the output's tail.
        env: environment (default: this one).
        cwd: working directory.
        what: name used in the failure message (default: the command).

    Returns:
        The finished process (any exit status: the caller asserts on it).

    Raises:
        AssertionError: the time limit passed.
    """
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output, _ = proc.communicate()
        name = what or " ".join(argv[:4])
        raise AssertionError(
            f"{name} still running after {timeout_s:.0f} s (killed); the last of its output:\n"
            f"{tail(output)}"
        ) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, output, "")
