"""`python -m jobs.refine` through `main([...])`: exit status, output, one-line errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jobs.refine import main
from pipelines.io.manifest import read_manifest
from pipelines.io.storage import resolve
from tests.pipelines.refine.test_stage import synthetic_row, write_ingest_output


@pytest.fixture(scope="module")
def ingest_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    loc = resolve(str(tmp_path_factory.mktemp("refine_job") / "ingest"))
    write_ingest_output(loc, [synthetic_row(i) for i in range(6)], rows_per_group=3)
    return loc.uri


def test_job_writes_seeds_then_has_nothing_to_do(
    ray_session: None, ingest_uri: str, tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "crf.json"
    config.write_text(json.dumps({"iterations": 5, "bilateral_srgb": 6}))
    output = str(tmp_path / "refine")
    argv = ["--input", ingest_uri, "--output", output, "--method", "weaktr"]
    argv += ["--bg-threshold", "0.4", "--config", str(config), "--num-cpus-per-task", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "seeds" in printed
    manifest = read_manifest(output)
    assert manifest.counts == {"input": 6, "output": 6, "quarantined": 0}
    seeds = manifest.config["seeds"]
    assert (seeds["iterations"], seeds["bilateral_srgb"], seeds["bg_threshold"]) == (5, 6, 0.4)
    assert manifest.metrics is not None and manifest.metrics["seeds"]["miou"] > 0

    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    # another recipe into the same output is refused (exit 1, one line) unless --overwrite
    assert main([*argv[:4], "--method", "clip-es"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and len(err.splitlines()) == 1


def test_job_missing_input_is_one_line_exit_1(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    code = main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "incomplete" in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "psa"],
        ["--bg-threshold", "1.5"],
        ["--no-such-flag"],
        ["--progress-every", "0"],
    ],
)
def test_job_usage_errors_exit_2(
    tmp_path: Any, capsys: pytest.CaptureFixture, extra: list[str]
) -> None:
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip()
