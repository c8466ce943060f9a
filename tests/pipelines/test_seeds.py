"""CAM -> seed refinement on synthetic scenes with known objects (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from pydensecrf.utils import unary_from_labels

from pipelines.seeds import SeedConfig, cam_argmax, cam_to_probabilities, refine_seed
from weakclip.crf import crf_inference

H, W = 96, 128


def _blur(x: np.ndarray, radius: int, passes: int = 3) -> np.ndarray:
    """Repeated box blur (≈ Gaussian) with edge padding; no scipy needed."""
    for axis in (0, 1):
        for _ in range(passes):
            pad = [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)]
            c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis)
            n = c.shape[axis]
            hi = np.take(c, range(2 * radius + 1, n), axis=axis)
            lo = np.take(c, range(0, n - 2 * radius - 1), axis=axis)
            x = (hi - lo) / (2 * radius + 1)
    return x


def _partial_cam(box: tuple[slice, slice]) -> np.ndarray:
    """A CAM that covers `box` (part of an object), blurred so it also bleeds outside it."""
    cam = np.zeros((H, W))
    cam[box] = 1.0
    cam = _blur(cam, 6)
    return ((cam - cam.min()) / (cam.max() - cam.min())).astype(np.float32)


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    """A red rectangle on a noisy grey background; its CAM covers ~60% of it, blurred."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(90, 25, (H, W, 3)), 0, 255).astype(np.uint8)
    obj = np.zeros((H, W), bool)
    obj[24:72, 32:96] = True
    image[obj] = np.clip(rng.normal((200, 40, 40), 10, (obj.sum(), 3)), 0, 255).astype(np.uint8)
    cams = _partial_cam((slice(28, 68), slice(34, 80)))[None]
    return {"image": image, "object": obj, "cams": cams}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_weaktr_crf_seed_beats_cam_argmax(scene: dict[str, np.ndarray]) -> None:
    baseline = cam_argmax(scene["cams"], [7])
    seed = refine_seed(scene["image"], scene["cams"], [7], config=SeedConfig())
    iou_argmax = _iou(baseline == 7, scene["object"])
    iou_crf = _iou(seed == 7, scene["object"])
    print(f"object IoU: cam_argmax {iou_argmax:.3f}, weaktr CRF seed {iou_crf:.3f}")
    assert iou_crf > iou_argmax + 0.1
    assert np.all(seed[~scene["object"]] == 0)


def test_ignore_only_from_clip_es(scene: dict[str, np.ndarray]) -> None:
    weaktr = refine_seed(scene["image"], scene["cams"], [7], config=SeedConfig())
    clip_es = refine_seed(
        scene["image"], scene["cams"], [7], config=SeedConfig.for_method("clip-es")
    )
    print(f"clip-es object IoU {_iou(clip_es == 7, scene['object']):.3f}")
    assert 255 not in weaktr
    assert set(np.unique(weaktr)) == {0, 7}
    assert set(np.unique(clip_es)) == {0, 7, 255}
    # The blur bleeds the CAM outside the object; the CRF keeps no foreground seed there.
    assert np.all(clip_es[~scene["object"]] != 7)


def _two_objects() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(90, 25, (H, W, 3)), 0, 255).astype(np.uint8)
    image[24:72, 20:70] = (200, 40, 40)
    image[10:40, 90:124] = (40, 40, 200)
    cams = np.stack(
        [
            _partial_cam((slice(26, 70), slice(22, 62))),
            _partial_cam((slice(12, 38), slice(92, 122))),
        ]
    )
    background = np.ones((H, W), bool)
    background[24:72, 20:70] = background[10:40, 90:124] = False
    return image, cams, background


@pytest.mark.parametrize("method", ["weaktr", "clip-es"])
@pytest.mark.parametrize("restrict", [True, False])
def test_labels_are_background_or_cam_classes(method: str, restrict: bool) -> None:
    image, cams, _ = _two_objects()
    classes = [15, 3]  # unsorted on purpose
    config = SeedConfig.for_method(method, restrict_to_present=restrict, num_classes=21)  # type: ignore[arg-type]
    seed = refine_seed(image, cams, classes, config=config)
    allowed = {0, 15, 3} | ({255} if method == "clip-es" else set())
    assert seed.shape == (H, W) and seed.dtype == np.uint8
    assert set(np.unique(seed)) <= allowed
    assert {15, 3} <= set(np.unique(seed))
    red = seed[24:72, 20:70]
    assert np.mean(red == 15) > 0.5 and not np.any(red == 3)


def test_zero_unsure_false_keeps_background_a_class() -> None:
    image, cams, background = _two_objects()
    seed = refine_seed(image, cams, [5, 9], config=SeedConfig())
    ours = float(np.mean(seed[background] == 0))
    # pydensecrf's default (zero_unsure=True) reads label 0 as "unknown": the background
    # gets a uniform unary and a foreground class or a phantom label takes it over.
    hard = cam_to_probabilities(cams, bg_threshold=0.43).argmax(axis=0)
    unary = unary_from_labels(hard, 3, gt_prob=0.7, zero_unsure=True)
    q = crf_inference(image, unary, **SeedConfig().crf_params())  # type: ignore[arg-type]
    # Rows of that unary are labels 1..3: 1 -> class 5, 2 -> class 9, 3 -> nobody.
    default = np.array([5, 9, 254], np.uint8)[q.argmax(axis=0)]
    theirs = float(np.mean(default[background] == 0))
    print(f"background kept: zero_unsure=False {ours:.3f}, pydensecrf default {theirs:.3f}")
    assert ours > 0.95 and theirs == 0.0


def test_cam_to_probabilities_by_hand() -> None:
    cams = np.array([[[0.2, 0.8, 0.0]], [[0.6, 0.1, 0.0]]], np.float32)  # 2 x 1 x 3
    weaktr = cam_to_probabilities(cams, method="weaktr", bg_threshold=0.4)
    np.testing.assert_allclose(weaktr[:, 0, 0], np.array([0.4, 0.2, 0.6]) / 1.2, rtol=1e-6)
    np.testing.assert_allclose(weaktr[:, 0, 2], [1.0, 0.0, 0.0])
    clip_es = cam_to_probabilities(cams, method="clip-es", bg_power=2.0)
    # background = (1 - max) ** 2: 0.16, 0.04, 1.0
    np.testing.assert_allclose(clip_es[:, 0, 0], np.array([0.16, 0.2, 0.6]) / 0.96, rtol=1e-6)
    np.testing.assert_allclose(clip_es[:, 0, 1], np.array([0.04, 0.8, 0.1]) / 0.94, rtol=1e-6)
    np.testing.assert_allclose(clip_es[:, 0, 2], [1.0, 0.0, 0.0])


def test_cam_argmax_by_hand() -> None:
    cams = np.array([[[0.2, 0.8, 0.43, 0.5]], [[0.6, 0.1, 0.1, 0.7]]], np.float32)
    # Pixel 2 ties with the background plane: background wins.
    assert cam_argmax(cams, [4, 11], bg_threshold=0.43).tolist() == [[11, 4, 0, 11]]


def test_no_classes_is_all_background(scene: dict[str, np.ndarray]) -> None:
    empty = np.zeros((0, H, W), np.float32)
    for method in ("weaktr", "clip-es"):
        seed = refine_seed(scene["image"], empty, [], config=SeedConfig.for_method(method))  # type: ignore[arg-type]
        assert seed.shape == (H, W) and not seed.any()


def test_read_only_and_float16_inputs(scene: dict[str, np.ndarray]) -> None:
    expected = refine_seed(scene["image"], scene["cams"], [7], config=SeedConfig())
    image = scene["image"].copy()
    cams = scene["cams"].astype(np.float16)
    image.setflags(write=False)
    cams.setflags(write=False)
    seed = refine_seed(image, cams, np.array([7], np.int16), config=SeedConfig())
    assert np.mean(seed == expected) > 0.99


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image": np.zeros((H, W, 3), np.float32)}, "uint8"),
        ({"image": np.zeros((H, W), np.uint8)}, "H x W x 3"),
        ({"image": np.zeros((H, W + 1, 3), np.uint8)}, "CAMs are"),
        ({"cams": np.full((1, H, W), np.nan, np.float32)}, "non-finite"),
        ({"cams": np.full((1, H, W), 3.0, np.float32)}, r"\[0, 1\]"),
        ({"cams": np.zeros((1, H, W), np.int32)}, "float"),
        ({"cams": np.zeros((H, W), np.float32)}, "C x H x W"),
        ({"classes": [0]}, "foreground ids"),
        ({"classes": [255]}, "foreground ids"),
        ({"classes": [21]}, "foreground ids"),
        ({"classes": [1.5]}, "integers"),
        ({"classes": [1, 2]}, "one class id per CAM plane"),
    ],
)
def test_refine_seed_validation(change: dict, match: str) -> None:
    args = {
        "image": np.zeros((H, W, 3), np.uint8),
        "cams": np.zeros((1, H, W), np.float32),
        "classes": [1],
        **change,
    }
    with pytest.raises(ValueError, match=match):
        refine_seed(args["image"], args["cams"], args["classes"], config=SeedConfig(num_classes=21))


def test_repeated_classes_rejected() -> None:
    with pytest.raises(ValueError, match="repeat"):
        cam_argmax(np.zeros((2, 4, 4), np.float32), [3, 3])


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"method": "psa"}, "method"),
        ({"bg_threshold": 1.2}, "bg_threshold"),
        ({"restrict_to_present": False}, "num_classes"),
        ({"num_classes": 300}, "num_classes"),
        ({"gt_prob": 1.0}, "gt_prob"),
        ({"iterations": -1}, "iterations"),
        ({"bilateral_srgb": 0}, "bilateral_srgb"),
    ],
)
def test_config_validation(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SeedConfig(**fields)


def test_for_method_presets() -> None:
    clip_es = SeedConfig.for_method("clip-es")
    assert clip_es.crf_params() == {
        "iterations": 10,
        "gaussian_sxy": 1,
        "gaussian_compat": 3,
        "bilateral_sxy": 67,
        "bilateral_srgb": 3,
        "bilateral_compat": 4,
    }
    assert SeedConfig.for_method("weaktr", bg_threshold=0.42) == SeedConfig(bg_threshold=0.42)
