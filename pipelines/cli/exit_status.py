"""How a job exits: 0 success; 1 failure with one redacted line on stderr; 2 usage error.

The traceback too with `--debug` or `WEAKCLIP_DEBUG=1`; 130 when interrupted.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.cli.options import DEBUG_ENV, UsageError
from pipelines.io.storage import redact

MAX_ERROR_CHARS = 1000


def run_job(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """The exit status of a job's `fn(argv)` (module docstring): its own, else 0; 1 for any
    exception (one redacted `error: ...` line on stderr); 2 for usage errors."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = fn(args)
    except SystemExit as e:  # argparse: 2 on errors (message already printed), 0 on --help
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(f"error: {one_line(str(e.code))}", file=sys.stderr)
        return 1
    except UsageError as e:
        _report(e, debug)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the job boundary: every failure becomes exit 1
        _report(e, debug)
        return 1
    return 0 if result is None else int(result)


def entry_points(
    fn: Callable[[list[str]], int | None],
) -> tuple[Callable[..., int], Callable[[], None]]:
    """A job's `main(argv=None) -> status` (`run_job` around `fn`) and its console script."""
    main = functools.partial(run_job, fn)
    return main, lambda: sys.exit(main())


def result_status(result: Any) -> int:
    """0 for a stage result that is `ok`; else its one-line `message` on stderr and 1."""
    if result.ok:
        return 0
    print(f"error: {result.message}", file=sys.stderr)
    return 1


def to_stderr(line: str) -> None:
    """A progress sink for jobs whose stdout is their result."""
    print(line, file=sys.stderr)


def one_line(text: str) -> str:
    """Collapse a message to one redacted line of at most `MAX_ERROR_CHARS`."""
    line = " ".join(redact(text).split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def describe_error(error: BaseException) -> str:
    """`Type: first line of the message`, looking through Ray's task-error wrappers."""
    chain = _ray_chain(error)
    error = chain[-1]
    if type(error).__name__ == "UserCodeException" and error.__cause__ is None:
        # Ray Data wraps a UDF's exception; the wrapper reaches the driver without its cause,
        # whose type and message survive only in the remote traceback text.
        for wrapper in reversed(chain):
            root = _root_exception_line(str(wrapper))
            if root is not None:
                return one_line(root)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, UsageError):
        return one_line(lines[0] if lines else "usage error")
    message = lines[0] if lines else ""
    return one_line(f"{type(error).__name__}: {message}" if message else type(error).__name__)


def _report(error: BaseException, debug: bool) -> None:
    if debug:
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr, end="")
    quiet = debug or isinstance(error, UsageError)
    hint = "" if quiet else f" (--debug or {DEBUG_ENV}=1 for details)"
    print(f"error: {describe_error(error)}{hint}", file=sys.stderr)


_CHAIN_MARKERS = (
    "The above exception was the direct cause of the following exception",
    "During handling of the above exception, another exception occurred",
)
_EXCEPTION_LINE = re.compile(r"^(?:[a-z_]\w*\.)*([A-Z]\w*): (\S.*)$")  # [module.]Type: msg


def _root_exception_line(traceback_text: str) -> str | None:
    """`Type: message` of the first exception of a printed chain (the root cause), if any."""
    cuts = [traceback_text.find(m) for m in _CHAIN_MARKERS if m in traceback_text]
    if not cuts:
        return None
    for line in reversed(traceback_text[: min(cuts)].splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return None


def _ray_chain(error: BaseException) -> list[BaseException]:
    """`error` and the causes inside Ray's wrappers, outermost first: task errors (`cause`),
    Ray Train's worker-group errors (the lowest rank's failure) and controller errors."""
    chain = [error]
    while type(error).__module__.startswith("ray.") and len(chain) <= 10:
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            cause = failures[min(failures)]
        else:
            cause = (
                getattr(error, "cause", None)
                or getattr(error, "controller_failure", None)
                or error.__cause__
            )
        if not isinstance(cause, BaseException):
            break
        error = cause
        chain.append(error)
    return chain
