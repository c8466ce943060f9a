"""The make_synthetic job: exit statuses, local and S3 outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.make_synthetic import main
from pipelines.safe_pickle import load_cls_labels
from pipelines.storage import resolve

SMALL = ["--num-images", "4", "--seed", "0", "--height", "64", "--width", "96", "--workers", "1"]


def test_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert main(["--output", str(out), *SMALL, "--val-fraction", "0.5"]) == 0
    assert "wrote 2 train + 2 val images" in capsys.readouterr().out
    for name in ("classes.txt", "cls_labels.npy", "train.txt", "val.txt"):
        assert (out / name).is_file()
    assert len(list((out / "cams").glob("*.npy"))) == 4
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 4


def test_file_uri_clip_es_and_bad_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    args = ["--output", out.as_uri(), *SMALL, "--layout", "clip-es", "--plant-bad-inputs"]
    assert main(args) == 0
    assert "13 bad rows" in capsys.readouterr().out
    labels = load_cls_labels((out / "cls_labels.npy").read_bytes())
    assert "bad_truncated_cam" in labels and "../../etc/passwd" in labels


@pytest.mark.parametrize(
    "args",
    [
        [],  # --output missing
        ["--output", "x", "--num-images", "0", "--seed", "0"],
        ["--output", "x", "--num-images", "2", "--seed", "0", "--layout", "voc"],
        ["--output", "x", "--num-images", "2", "--seed", "0", "--val-fraction", "1"],
        ["--output", "ftp://host/x", "--num-images", "2", "--seed", "0"],
    ],
)
def test_usage_errors(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert not (tmp_path / "x").exists()


def test_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["--output", str(blocker / "ds"), *SMALL]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_s3_output(s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"{s3_bucket}/synthetic"
    assert main(["--output", uri, *SMALL]) == 0
    loc = resolve(uri)
    names = {p.rsplit("/", 1)[-1] for p in loc.fs.find(loc.path)}
    assert {"classes.txt", "cls_labels.npy", "train.txt", "val.txt", "syn_000003.jpg"} <= names
    labels = load_cls_labels(loc.fs.cat_file(loc.join("cls_labels.npy")))
    assert sorted(labels) == [f"syn_{i:06d}" for i in range(4)]
    assert all(v.dtype == np.float32 for v in labels.values())
