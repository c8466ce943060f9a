"""The camouflage synthetic family: determinism, sizes, class spaces, shared colours, CAMs."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from pipelines.io.class_spaces import (
    COCO81,
    COCO91,
    COCO_UNUSED_IDS,
    VOC,
    ClassSpace,
    labels_from_multihot,
)
from pipelines.io.safe_pickle import load_cls_labels, load_npy_pickle
from pipelines.metrics import ConfusionAccumulator
from pipelines.seeds import cam_argmax
from pipelines.synthetic.camouflage import (
    ANCHOR_CLASSES,
    SUBSET_SIZES,
    camo_classes,
    camo_sample_id,
    generate_camo_sample,
)
from pipelines.synthetic.dataset import write_dataset
from pipelines.synthetic.shapes import Sample, generate_sample

BG_THRESHOLD = 0.43  # the refine stage's default


@pytest.fixture(scope="module")
def voc_samples() -> list[Sample]:
    return [generate_camo_sample(i, seed=0, class_space=VOC) for i in range(24)]


@pytest.fixture(scope="module")
def coco_samples() -> list[Sample]:
    return [generate_camo_sample(i, seed=0, class_space=COCO91) for i in range(16)]


def argmax_miou(samples: list[Sample], num_classes: int) -> float:
    accumulator = ConfusionAccumulator(num_classes)
    for sample in samples:
        keys = sorted(sample.cams)
        cams = np.stack([sample.cams[k] for k in keys])
        accumulator.add(
            cam_argmax(cams, [k + 1 for k in keys], bg_threshold=BG_THRESHOLD), sample.gt
        )
    return accumulator.score().miou


def test_same_arguments_same_sample_otherwise_different() -> None:
    a = generate_camo_sample(5, seed=2, class_space=COCO91)
    b = generate_camo_sample(5, seed=2, class_space=COCO91)
    assert a.image_id == camo_sample_id(5) == "camo_000005"
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.gt, b.gt)
    assert a.labels == b.labels and list(a.cams) == list(b.cams)
    for key in a.cams:
        np.testing.assert_array_equal(a.cams[key], b.cams[key])
    assert not np.array_equal(a.image, generate_camo_sample(6, seed=2, class_space=COCO91).image)
    other = generate_camo_sample(5, seed=3, class_space=COCO91)
    assert a.image.shape != other.image.shape or not np.array_equal(a.image, other.image)


def test_sizes_are_voc_like(voc_samples: list[Sample]) -> None:
    shapes = [s.image.shape[:2] for s in voc_samples]
    for sample, (height, width) in zip(voc_samples, shapes, strict=True):
        assert 281 <= max(height, width) <= 500 and min(height, width) >= 250
        assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
        assert sample.gt.shape == (height, width) and sample.gt.dtype == np.uint8
    assert any(h > w for h, w in shapes) and any(h < w for h, w in shapes)  # both orientations
    assert len(set(shapes)) > len(shapes) // 2  # drawn per image, not one fixed size


@pytest.mark.parametrize("space", [VOC, COCO91], ids=["voc", "coco91"])
def test_class_subset(space: ClassSpace) -> None:
    for seed in range(20):
        looks = camo_classes(seed, space)
        ids = list(looks)
        assert ids == sorted(ids) and len(ids) == SUBSET_SIZES[space.name]
        assert all(1 <= i < space.num_classes for i in ids)
        if space.name == "coco91":
            assert not set(ids) & set(COCO_UNUSED_IDS)  # the ten ids COCO never annotated
        names = {space.class_names[i] for i in ids}
        assert set(ANCHOR_CLASSES) <= names
        silhouettes = [look.silhouette for look in looks.values()]
        assert len(set(silhouettes)) == len(silhouettes)  # one silhouette per class
    assert camo_classes(0, space) == camo_classes(0, space)
    assert len({tuple(camo_classes(s, space)) for s in range(6)}) > 1


@pytest.mark.parametrize("which", ["voc", "coco91"])
def test_labels_gt_and_cams_agree(
    which: str, voc_samples: list[Sample], coco_samples: list[Sample]
) -> None:
    space, samples = (VOC, voc_samples) if which == "voc" else (COCO91, coco_samples)
    subset = set(camo_classes(0, space))
    assert not set(COCO_UNUSED_IDS) & (subset if which == "coco91" else set())
    max_objects = 3 if which == "voc" else 4
    counts = []
    for sample in samples:
        labels = set(sample.labels)
        counts.append(len(labels))
        assert list(sample.labels) == sorted(labels) and 1 <= len(labels) <= max_objects
        assert labels <= subset and not labels & space.unused_ids
        assert set(np.unique(sample.gt).tolist()) <= {0, 255} | labels
        assert sorted(sample.cams) == [c - 1 for c in sample.labels]
        for plane in sample.cams.values():
            assert plane.dtype == np.float32 and plane.shape == sample.gt.shape
            assert plane.min() == pytest.approx(0.0, abs=1e-6)
            assert plane.max() == pytest.approx(1.0, abs=1e-6)
        valid = sample.gt != 255  # every label border lies inside the void band
        assert not ((sample.gt[:, 1:] != sample.gt[:, :-1]) & valid[:, 1:] & valid[:, :-1]).any()
        assert not ((sample.gt[1:] != sample.gt[:-1]) & valid[1:] & valid[:-1]).any()
    assert len(set(counts)) > 1


def colour_separability(samples: list[Sample]) -> float:
    """How far apart class mean colours lie, in units of one class's own spread.

    Every (image, class) region gives a mean RGB; the result is the mean distance between the
    class centroids (background included) over the mean distance of a region to its own
    centroid. Colour-coded classes score far above 1; shared colours score about 1 or less.
    """
    regions: dict[int, list[np.ndarray]] = {}
    for sample in samples:
        rgb = sample.image.reshape(-1, 3).astype(np.float64)
        for class_id in (0, *sample.labels):
            pixels = rgb[sample.gt.ravel() == class_id]
            if len(pixels) > 200:
                regions.setdefault(class_id, []).append(pixels.mean(axis=0))
    centroids = {k: np.mean(v, axis=0) for k, v in regions.items() if len(v) >= 2}
    spread = np.mean([np.linalg.norm(m - centroids[k]) for k in centroids for m in regions[k]])
    keys = sorted(centroids)
    between = np.mean(
        [np.linalg.norm(centroids[a] - centroids[b]) for a in keys for b in keys if a < b]
    )
    return float(between / spread)


def test_colour_does_not_give_the_class_away(voc_samples: list[Sample]) -> None:
    shapes = [generate_sample(i, seed=0, height=160, width=224) for i in range(24)]
    assert colour_separability(shapes) > 3  # the shapes family: colour alone separates classes
    assert colour_separability(voc_samples) < 1.5


def test_colours_family_is_the_same_scenes_with_one_colour_per_class(
    voc_samples: list[Sample],
) -> None:
    coloured = [
        generate_camo_sample(i, seed=0, class_space=VOC, class_colours=True) for i in range(24)
    ]
    assert colour_separability(coloured) > 3  # colour alone now separates the classes
    for plain, colour in zip(voc_samples, coloured, strict=True):
        assert colour.image.shape == plain.image.shape and colour.labels == plain.labels
        np.testing.assert_array_equal(colour.gt, plain.gt)  # same objects, other colours


def test_objects_keep_an_edge(voc_samples: list[Sample]) -> None:
    """What a CRF on colours still has: a step across object borders, above the clutter's."""
    across, within = [], []
    for sample in voc_samples[:8]:
        left, right = sample.gt[:, :-6], sample.gt[:, 6:]  # pixel pairs 6 px apart: past the band
        step = np.abs(sample.image[:, :-6].astype(np.float32) - sample.image[:, 6:]).max(axis=2)
        fg_left, fg_right = (left > 0) & (left < 255), (right > 0) & (right < 255)
        across.append(step[(fg_left & (right == 0)) | (fg_right & (left == 0))].mean())
        within.append(step[(left == 0) & (right == 0)].mean())
    assert np.median(across) > 2 * np.median(within)


def test_cam_argmax_miou_is_realistic(
    voc_samples: list[Sample], coco_samples: list[Sample]
) -> None:
    voc, coco = argmax_miou(voc_samples, VOC.num_classes), argmax_miou(coco_samples, 91)
    print(f"camouflage CAM argmax mIoU at {BG_THRESHOLD}: voc {voc:.3f}, coco91 {coco:.3f}")
    assert 0.45 <= voc <= 0.65 and 0.45 <= coco <= 0.65


def test_crf_seeds_beat_the_cam_argmax(voc_samples: list[Sample]) -> None:
    seeds = pytest.importorskip("pipelines.seeds")
    config = seeds.SeedConfig(method="weaktr")  # the refine stage's defaults
    argmax = ConfusionAccumulator(VOC.num_classes)
    refined = ConfusionAccumulator(VOC.num_classes)
    for sample in voc_samples[:8]:  # CRF ~0.3 s per image on one core
        keys = sorted(sample.cams)
        cams = np.stack([sample.cams[k] for k in keys])
        classes = [k + 1 for k in keys]
        argmax.add(cam_argmax(cams, classes, bg_threshold=config.bg_threshold), sample.gt)
        refined.add(seeds.refine_seed(sample.image, cams, classes, config=config), sample.gt)
    before, after = argmax.score().miou, refined.score().miou
    print(f"8 camouflage images: CAM argmax {before:.3f}, WeakTr CRF {after:.3f}")
    assert after > before + 0.03


def test_write_dataset_coco91() -> None:
    fs = fsspec.filesystem("memory")
    root = "/camo-coco"
    written = write_dataset(
        fs, root, num_images=3, seed=1, family="camouflage", classes="coco91", workers=1,
        height=64, width=64,  # ignored by this family
    )  # fmt: skip
    assert written.class_names == COCO91.class_names
    assert fs.cat_file(f"{root}/classes.txt").decode().splitlines() == list(COCO91.class_names)
    labels = load_cls_labels(fs.cat_file(f"{root}/cls_labels.npy"))
    assert sorted(labels) == [camo_sample_id(i) for i in range(3)]
    for index in range(3):
        sample = generate_camo_sample(index, seed=1, class_space=COCO91)
        vector = labels[sample.image_id]
        assert vector.shape == (90,) and vector.dtype == np.float32
        assert labels_from_multihot(vector, COCO91) == list(sample.labels)
        cams = load_npy_pickle(fs.cat_file(f"{root}/cams/{sample.image_id}.npy"))
        assert sorted(cams) == [c - 1 for c in sample.labels]
        assert cams[min(cams)].shape == sample.gt.shape != (64, 64)
    fs.rm(root, recursive=True)


def test_validation() -> None:
    with pytest.raises(ValueError, match="class_space"):
        generate_camo_sample(0, seed=0, class_space=COCO81)
    with pytest.raises(ValueError):
        generate_camo_sample(-1, seed=0)
    fs = fsspec.filesystem("memory")
    with pytest.raises(ValueError, match="classes"):
        write_dataset(fs, "/x", num_images=1, seed=0, family="camouflage", classes="coco81")
    with pytest.raises(ValueError, match="classes"):
        write_dataset(fs, "/x", num_images=1, seed=0, classes="voc")
    with pytest.raises(ValueError, match="family"):
        write_dataset(fs, "/x", num_images=1, seed=0, family="noise")  # type: ignore[arg-type]
