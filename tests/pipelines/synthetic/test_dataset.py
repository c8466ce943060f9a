"""Writing the synthetic dataset in the MCTformer/CLIP-ES layouts, and planting bad inputs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipelines.io.class_spaces import class_space_from_arg, labels_from_multihot
from pipelines.io.codecs import decode_label_map, voc_palette
from pipelines.io.safe_pickle import (
    CamDecodeError,
    UnsafePickleError,
    load_cls_labels,
    load_npy_pickle,
)
from pipelines.synthetic.dataset import BAD_INPUTS, pixel_bomb_png, plant_bad_inputs, write_dataset
from pipelines.synthetic.shapes import SYNTHETIC_CLASSES, generate_sample

SIZE = {"height": 64, "width": 96}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "ds"
    write_dataset(
        fsspec.filesystem("file"), str(root), num_images=8, seed=3, val_fraction=0.25, workers=1,
        **SIZE,
    )  # fmt: skip
    return root


def test_layout(dataset: Path) -> None:
    ids = [f"syn_{i:06d}" for i in range(8)]
    for image_id in ids:
        for relative in (
            f"JPEGImages/{image_id}.jpg",
            f"cams/{image_id}.npy",
            f"SegmentationClassAug/{image_id}.png",
        ):
            assert (dataset / relative).is_file(), relative
    train = (dataset / "train.txt").read_text().split()
    val = (dataset / "val.txt").read_text().split()
    assert len(val) == 2 and sorted(train + val) == ids and not set(train) & set(val)
    space = class_space_from_arg((dataset / "classes.txt").read_text())
    assert space.class_names == SYNTHETIC_CLASSES.class_names


def test_files_decode_and_agree(dataset: Path) -> None:
    labels = load_cls_labels((dataset / "cls_labels.npy").read_bytes())
    assert sorted(labels) == [f"syn_{i:06d}" for i in range(8)]
    for image_id, vector in labels.items():
        index = int(image_id.split("_")[1])
        sample = generate_sample(index, seed=3, **SIZE)
        assert vector.shape == (6,) and vector.dtype == np.float32
        assert labels_from_multihot(vector, SYNTHETIC_CLASSES) == list(sample.labels)
        cams = load_npy_pickle((dataset / f"cams/{image_id}.npy").read_bytes())
        assert sorted(cams) == [c - 1 for c in sample.labels]
        for key, plane in cams.items():
            assert plane.dtype == np.float32 and plane.shape == (64, 96)
            np.testing.assert_array_equal(plane, sample.cams[key])
        with Image.open(dataset / f"JPEGImages/{image_id}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (96, 64)
            # JPEG is lossy, but close to the generated pixels
            error = np.abs(np.asarray(image, np.float32) - sample.image.astype(np.float32))
            assert error.mean() < 10  # another image would be off by ~30
        gt_bytes = (dataset / f"SegmentationClassAug/{image_id}.png").read_bytes()
        with Image.open(io.BytesIO(gt_bytes)) as gt_image:
            assert gt_image.mode == "P" and gt_image.getpalette()[:60] == voc_palette()[:60]
        np.testing.assert_array_equal(decode_label_map(gt_bytes), sample.gt)


def test_same_seed_same_bytes_whatever_the_workers(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_dataset(
        fsspec.filesystem("file"), str(again), num_images=8, seed=3, val_fraction=0.25, workers=2,
        **SIZE,
    )  # fmt: skip
    assert tree(again) == tree(dataset)
    other = tmp_path / "other"
    write_dataset(fsspec.filesystem("file"), str(other), num_images=8, seed=4, workers=1, **SIZE)
    assert tree(other)["JPEGImages/syn_000000.jpg"] != tree(dataset)["JPEGImages/syn_000000.jpg"]


def test_clip_es_layout_on_a_memory_filesystem() -> None:
    fs = fsspec.filesystem("memory")
    root = "/clip-es-test"
    written = write_dataset(fs, root, num_images=3, seed=1, layout="clip-es", workers=1, **SIZE)
    assert written.class_names == SYNTHETIC_CLASSES.class_names
    for index in range(3):
        sample = generate_sample(index, seed=1, **SIZE)
        cam = load_npy_pickle(fs.cat_file(f"{root}/cams/{sample.image_id}.npy"))
        assert set(cam) == {"keys", "attn_highres"}
        assert cam["keys"].tolist() == [c - 1 for c in sample.labels]
        stack = cam["attn_highres"]
        assert stack.dtype == np.float16 and stack.shape == (len(sample.labels), 64, 96)
        np.testing.assert_allclose(stack[0], sample.cams[sample.labels[0] - 1], atol=1e-3)
    fs.rm(root, recursive=True)


def test_write_dataset_validates() -> None:
    fs = fsspec.filesystem("memory")
    with pytest.raises(ValueError):
        write_dataset(fs, "/x", num_images=0, seed=0)
    with pytest.raises(ValueError):
        write_dataset(fs, "/x", num_images=1, seed=0, val_fraction=1.0)
    with pytest.raises(ValueError, match="layout"):
        write_dataset(fs, "/x", num_images=1, seed=0, layout="voc")  # type: ignore[arg-type]


def test_pixel_bomb_png_is_tiny_but_huge() -> None:
    data = pixel_bomb_png()
    assert len(data) < 100_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    small = pixel_bomb_png(64)  # same construction, decodable size: the PNG is valid
    with Image.open(io.BytesIO(small)) as image:
        assert image.size == (64, 64) and not np.asarray(image).any()


@pytest.mark.parametrize("layout", ["mctformer", "clip-es"])
def test_plant_bad_inputs(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "ds"
    fs = fsspec.filesystem("file")
    write_dataset(fs, str(root), num_images=2, seed=0, layout=layout, workers=1, **SIZE)
    sentinel = tmp_path / "pickle-ran"
    expected = plant_bad_inputs(fs, str(root), sentinel_path=str(sentinel), layout=layout)
    assert expected == {image_id: keyword for image_id, keyword in BAD_INPUTS.values()}
    assert all(k.startswith("bad_") for k in expected if k != "../../etc/passwd")

    split = (root / "train.txt").read_text().splitlines()
    labels = load_cls_labels((root / "cls_labels.npy").read_bytes())
    for image_id in expected:
        assert image_id in split and image_id in labels
    assert split.count("bad_duplicate_id") == 2
    assert (root / "JPEGImages/bad_duplicate_id.png").is_file()
    assert not (root / "JPEGImages/bad_missing_image.jpg").exists()
    assert (root / "cams/bad_missing_image.npy").is_file()
    assert not labels["bad_empty_labels"].any()
    assert labels["bad_label_length"].shape == (7,)
    # nothing escaped the dataset directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    cam = root / "cams"
    with pytest.raises(CamDecodeError, match="truncated"):
        load_npy_pickle((cam / "bad_truncated_cam.npy").read_bytes())
    with pytest.raises(CamDecodeError, match="npy"):
        load_npy_pickle((cam / "bad_not_npy_cam.npy").read_bytes())
    with pytest.raises(UnsafePickleError, match="unsafe"):
        load_npy_pickle((cam / "bad_malicious_cam.npy").read_bytes())
    assert not sentinel.exists()

    def planes(image_id: str) -> tuple[list[int], np.ndarray]:
        value = load_npy_pickle((cam / f"{image_id}.npy").read_bytes())
        if layout == "clip-es":
            return value["keys"].tolist(), value["attn_highres"].astype(np.float32)
        keys = sorted(value)
        return keys, np.stack([value[k] for k in keys])

    assert not np.isfinite(planes("bad_nonfinite_cam")[1]).all()
    with Image.open(root / "JPEGImages/bad_cam_shape.jpg") as image:
        assert planes("bad_cam_shape")[1].shape[1:] != (image.height, image.width)
    keys, _ = planes("bad_cam_class")
    labelled = labels_from_multihot(labels["bad_cam_class"], SYNTHETIC_CLASSES)
    assert not set(k + 1 for k in keys) <= set(labelled)
    _, good = planes("bad_label_length")  # its CAM is fine: only the vector is wrong
    assert np.isfinite(good).all()
    with pytest.raises(OSError):
        Image.open(root / "JPEGImages/bad_undecodable_image.jpg")


def test_the_malicious_cam_is_live(tmp_path: Path) -> None:
    """Unpickled without restrictions, the planted file really runs its command."""
    root = tmp_path / "ds"
    fs = fsspec.filesystem("file")
    write_dataset(fs, str(root), num_images=1, seed=0, workers=1, **SIZE)
    sentinel = tmp_path / "pickle-ran"
    plant_bad_inputs(fs, str(root), kinds=["malicious_cam"], sentinel_path=str(sentinel))
    data = (root / "cams/bad_malicious_cam.npy").read_bytes()
    np.load(io.BytesIO(data), allow_pickle=True)  # our own planted file, to prove the canary
    assert sentinel.exists()
    os.remove(sentinel)


def test_plant_bad_inputs_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        plant_bad_inputs(fsspec.filesystem("file"), str(tmp_path), kinds=["nope"])
