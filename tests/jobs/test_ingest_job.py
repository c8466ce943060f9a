"""`python -m jobs.ingest` through `main([...])`: exit codes and a smoke run."""

from __future__ import annotations

from jobs.ingest import main
from jobs.make_synthetic import main as make_synthetic
from pipelines.io.manifest import read_manifest


def test_usage_error_exits_2(tmp_path, capsys) -> None:
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--layout", "x"]) == 2
    bad_config = tmp_path / "c.yaml"
    bad_config.write_text("no_such_field: 1\n")
    args = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(bad_config)]
    assert main(args) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_missing_input_exits_1_with_one_line(tmp_path, capsys, ray_session) -> None:
    code = main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err


def test_smoke_with_bad_rows_and_error_fraction(tmp_path, capsys, ray_session) -> None:
    data = tmp_path / "data"
    assert (
        make_synthetic(
            [
                "--output",
                str(data),
                "--num-images",
                "6",
                "--seed",
                "1",
                "--height",
                "64",
                "--width",
                "96",
                "--workers",
                "1",
                "--plant-bad-inputs",
            ]
        )
        == 0
    )
    common = ["--input", str(data), "--split", "train.txt", "--split", "val=val.txt"]
    # 13 bad rows of 20: over the default 1% limit -> exit 1, no _SUCCESS
    assert main([*common, "--output", str(tmp_path / "strict")]) == 1
    assert "max_error_fraction" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "_SUCCESS").exists()
    out = tmp_path / "lenient"
    assert main([*common, "--output", str(out), "--max-error-fraction", "0.9"]) == 0
    manifest = read_manifest(str(out))
    assert manifest.counts["quarantined"] == 13
    assert manifest.counts["output"] + 13 == manifest.counts["input"]
