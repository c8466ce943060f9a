"""The reliability-record mechanism itself: results come from real pytest outcomes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_CASES = """
import pytest

def test_ok(reliability, tmp_path):
    reliability.case(kind="input", name="case ok", injected="in | jected", checked="chk")
    reliability.observe("3 rows quarantined")
    reliability.observe(f"wrote {tmp_path}/x.png; <_io.BytesIO object at 0x7f00deadbeef>")

def test_bad(reliability):
    reliability.case(kind="fault", name="case bad", injected="i", checked="c")
    assert 1 == 2, "boom"

def test_skipped(reliability):
    reliability.case(kind="input", name="case skipped", injected="i", checked="c")
    pytest.importorskip("pipelines.no_such_module_here")

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_setup_error(reliability, broken):
    reliability.case(kind="input", name="never declared", injected="i", checked="c")
"""


def test_report_shows_real_outcomes(tmp_path: Path) -> None:
    (tmp_path / "test_cases.py").write_text(_CASES)
    report = tmp_path / "out" / "RELIABILITY.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.reliability.conftest",
            "-p",
            "no:cacheprovider",
            f"--rootdir={tmp_path}",
            str(tmp_path / "test_cases.py"),
            "--reliability-report",
            str(report),
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # one test failed
    text = report.read_text()
    assert "- Cases: 4 (1 error, 1 failed, 1 passed, 1 skipped)" in text
    assert "| 1 | fault | case bad | failed |" in text
    assert "| 2 | input | case ok | passed |" in text
    assert "| 3 | input | case skipped | skipped |" in text
    assert "- Injected: in | jected" in text
    assert "| 4 | ? | test_cases.py::test_setup_error | error in setup |" in text
    assert "  - 3 rows quarantined" in text
    assert "/test_ok0/x.png; <_io.BytesIO object>" in text and "  - wrote <tmp>/" in text
    assert "**failed**: AssertionError: boom" in text
    assert "could not import 'pipelines.no_such_module_here'" in text
    assert "**error in setup**: RuntimeError: setup broke" in text
    assert "test_cases.py::test_setup_error" in text
    assert "- Command: `" in text and "--reliability-report" in text
