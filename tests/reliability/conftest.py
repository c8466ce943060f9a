"""Reliability records: every test under tests/reliability is a documented case.

A test declares what it does through the `reliability` fixture::

    def test_x(reliability):
        reliability.case(kind="input", name="corrupt Parquet shard",
                         injected="...", checked="...")
        ...
        reliability.observe(f"{n} rows quarantined, {m} good rows unchanged")

The result of a case is the test's real pytest outcome (captured by `pytest_runtest_makereport`),
never something the test writes itself. With `--reliability-report PATH` the session writes a
Markdown document of every case (docs/RELIABILITY.md is produced by
`.venv/bin/python -m pytest tests/reliability --reliability-report docs/RELIABILITY.md`).

The option is registered here: it works whenever this directory is named on the command line
(pytest loads the conftest files of the given paths before it parses the options).
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

KINDS = ("fault", "input")
_RECORDS = pytest.StashKey[list["CaseRecord"]]()
_NODE_RECORD = pytest.StashKey["CaseRecord"]()


@dataclass
class CaseRecord:
    """One reliability case and what happened to it."""

    nodeid: str  # the pytest node id of the test
    kind: str = ""  # "fault" (injected failure) or "input" (hostile input)
    name: str = ""  # short title of the case
    injected: str = ""  # what was done to the system
    checked: str = ""  # what the test asserts
    observations: list[str] = field(default_factory=list)  # measured facts, in order
    outcome: str = "not run"  # passed / failed / skipped / error, from pytest's reports
    detail: str = ""  # skip reason or the first line of the failure
    duration_s: float = 0.0  # setup + call + teardown


_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


class Reliability:
    """The `reliability` fixture: declare the case, then add observations."""

    def __init__(self, record: CaseRecord, *, scrub: Sequence[str] = ()) -> None:
        self._record = record
        self._scrub = [s for s in scrub if s]

    def case(self, kind: str, name: str, injected: str, checked: str) -> None:
        """Declares the case this test documents (once per test).

        Args:
            kind: "fault" or "input".
            name: short title.
            injected: how the fault or bad input was introduced.
            checked: what the test asserts about the system's reaction.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if self._record.name:
            raise RuntimeError(f"case() already called in {self._record.nodeid}")
        if not name.strip():
            raise ValueError("name must not be empty")
        self._record.kind = kind
        self._record.name = name.strip()
        self._record.injected = injected.strip()
        self._record.checked = checked.strip()

    def observe(self, text: str) -> None:
        """Adds a measured fact (a count, a timing, a message) to the case.

        Run-specific noise is replaced so that the document is stable between runs: the
        session's temporary directory by `<tmp>`, object addresses by nothing.
        """
        text = str(text).strip()
        for prefix in self._scrub:
            text = text.replace(prefix, "<tmp>")
        self._record.observations.append(_ADDRESS.sub(r"<\1 object>", text))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        action="store",
        default=None,
        metavar="PATH",
        help="write a Markdown record of the reliability cases (tests/reliability) to PATH",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDS] = []


@pytest.fixture
def reliability(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Reliability]:
    """Records this test as a reliability case; its result is the test's pytest outcome."""
    record = CaseRecord(nodeid=request.node.nodeid)
    request.node.stash[_NODE_RECORD] = record
    request.config.stash.setdefault(_RECORDS, []).append(record)
    yield Reliability(record, scrub=[str(tmp_path_factory.getbasetemp())])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    record = item.stash.get(_NODE_RECORD, None)
    if record is None:
        return
    record.duration_s += report.duration
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            record.outcome = "xfailed" if report.skipped else "xpassed"
            record.detail = str(report.wasxfail)
        else:
            record.outcome = report.outcome
            record.detail = _detail(report)
    elif report.failed:  # setup or teardown error overrides a passing call
        record.outcome = f"error in {report.when}"
        record.detail = _detail(report)
    elif report.skipped and record.outcome == "not run":
        record.outcome = "skipped"
        record.detail = _detail(report)


def _detail(report: pytest.TestReport) -> str:
    """Skip reason or the last line of the failure (the exception message)."""
    if report.passed:
        return ""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip: (path, line, reason)
        reason = str(longrepr[2])
        return reason.removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0] if crash.message else ""
    lines = str(longrepr).strip().splitlines()
    return lines[-1] if lines else ""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--reliability-report", default=None)
    if not path:
        return
    records = session.config.stash.get(_RECORDS, [])
    target = Path(path)
    if not target.is_absolute():
        target = Path(session.config.invocation_params.dir) / target
    target.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(records, command=_command(session.config), commit=_commit(session))
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"reliability report: {len(records)} cases written to {target}")


def _command(config: pytest.Config) -> str:
    """The command line that ran this session, with the interpreter relative to the repo."""
    python = Path(sys.executable)
    root = Path(config.rootpath)
    try:
        python_text = str(python.relative_to(root))
    except ValueError:
        python_text = str(python)
    args = " ".join(shlex.quote(a) for a in config.invocation_params.args)
    return f"{python_text} -m pytest {args}".strip()


def _commit(session: pytest.Session) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=session.config.rootpath,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=session.config.rootpath,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    if result.returncode != 0 or not commit:
        return None
    return f"{commit} (with uncommitted changes)" if dirty.stdout.strip() else commit


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(records: list[CaseRecord], *, command: str, commit: str | None) -> str:
    """The reliability document: header with totals, a summary table, one section per case."""
    ordered = sorted(records, key=lambda r: KINDS.index(r.kind) if r.kind in KINDS else 2)
    totals: dict[str, int] = {}
    for record in ordered:
        key = record.outcome.split(" ")[0]
        totals[key] = totals.get(key, 0) + 1
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    total_text = ", ".join(f"{count} {key}" for key, count in sorted(totals.items()))
    lines = [
        "# Reliability record",
        "",
        "Generated by running the reliability tests; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Date: {now}",
        f"- Commit: {commit or 'unknown (not a git checkout)'}",
        f"- Cases: {len(ordered)} ({total_text or 'none'})",
        "",
        "Each result is the test's own pytest outcome. Kinds: **fault** = a failure injected "
        "into a running stage; **input** = hostile or malformed input.",
        "",
        "| # | Kind | Case | Result | Time (s) |",
        "|---|------|------|--------|----------|",
    ]
    for number, record in enumerate(ordered, 1):
        lines.append(
            f"| {number} | {record.kind or '?'} | {_one_line(record.name or record.nodeid)} "
            f"| {_one_line(record.outcome)} | {record.duration_s:.1f} |"
        )
    for number, record in enumerate(ordered, 1):
        lines += ["", f"## {number}. {record.name or record.nodeid}", ""]
        lines.append(f"- Kind: {record.kind or 'undeclared (the test never called case())'}")
        lines.append(f"- Test: `{record.nodeid}`")
        if record.injected:
            lines.append(f"- Injected: {record.injected}")
        if record.checked:
            lines.append(f"- Checked: {record.checked}")
        if record.observations:
            lines.append("- Observed:")
            lines += [f"  - {' '.join(obs.split())}" for obs in record.observations]
        result = f"**{record.outcome}**"
        if record.detail:
            result += f": {' '.join(record.detail.split())}"
        lines.append(f"- Result: {result} ({record.duration_s:.1f} s)")
    lines.append("")
    return "\n".join(lines)
