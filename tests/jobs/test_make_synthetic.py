"""The make_synthetic job: exit statuses, local and S3 outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.make_synthetic import main
from pipelines.io.class_spaces import COCO91, labels_from_multihot
from pipelines.io.safe_pickle import load_cls_labels, load_npy_pickle
from pipelines.io.storage import resolve

ARGS_X = ["--output", "x", "--num-images", "2", "--seed", "0"]
SMALL = ["--num-images", "4", "--seed", "0", "--height", "64", "--width", "96", "--workers", "1"]


def test_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert main(["--output", str(out), *SMALL, "--val-fraction", "0.5"]) == 0
    assert "wrote 2 train + 2 val images" in capsys.readouterr().out
    for name in ("classes.txt", "cls_labels.npy", "train.txt", "val.txt"):
        assert (out / name).is_file()
    assert len(list((out / "cams").glob("*.npy"))) == 4
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 4


def test_camouflage_coco91(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "camo"
    args = ["--output", str(out), "--num-images", "4", "--seed", "0", "--workers", "1"]
    assert main([*args, "--family", "camouflage", "--classes", "coco91"]) == 0
    assert "wrote 3 train + 1 val images" in capsys.readouterr().out
    assert (out / "classes.txt").read_text().splitlines() == list(COCO91.class_names)
    ids = sorted((out / "train.txt").read_text().split() + (out / "val.txt").read_text().split())
    assert ids == [f"camo_{i:06d}" for i in range(4)]
    labels = load_cls_labels((out / "cls_labels.npy").read_bytes())
    assert sorted(labels) == ids
    for image_id in ids:
        vector = labels[image_id]
        assert vector.shape == (90,)  # COCO category-id space without background
        classes = labels_from_multihot(vector, COCO91)  # refuses the unused ids
        cams = load_npy_pickle((out / f"cams/{image_id}.npy").read_bytes())
        assert sorted(cams) == [c - 1 for c in classes]
        with Image.open(out / f"JPEGImages/{image_id}.jpg") as image:
            width, height = image.size
        assert 281 <= max(height, width) <= 500  # drawn per image, --height/--width unused
        assert all(plane.shape == (height, width) for plane in cams.values())
        with Image.open(out / f"SegmentationClassAug/{image_id}.png") as gt:
            assert gt.size == (width, height)
            assert set(np.unique(np.asarray(gt)).tolist()) <= {0, 255, *classes}


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
        [*ARGS_X, "--classes", "voc"],  # --classes is for the camouflage family
        [*ARGS_X, "--family", "camouflage", "--classes", "coco81"],
        [*ARGS_X, "--family", "camouflage", "--plant-bad-inputs"],  # shapes only
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
