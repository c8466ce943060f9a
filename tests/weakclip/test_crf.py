"""Dense CRF wrapper: distributions out, validation, read-only inputs, exact class restriction."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from weakclip.crf import (
    boundary_crf_target,
    boundary_crf_targets,
    crf_inference,
    crf_labels,
    dense_crf,
)

PARAMS = {
    "iterations": 5,
    "gaussian_sxy": 3,
    "gaussian_compat": 3,
    "bilateral_sxy": 20,
    "bilateral_srgb": 13,
    "bilateral_compat": 10,
}


def _scene(k: int = 3, size: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red square on a dark noisy background, and noisy probabilities favouring it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    image[6:18, 6:18] = (210, 30, 30)
    logits = rng.normal(0, 1.0, (k, size, size))
    logits[1, 6:18, 6:18] += 1.0
    logits[0] += 0.5
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return image, probs.astype(np.float32)


def test_output_is_a_distribution_per_pixel() -> None:
    image, probs = _scene()
    q = dense_crf(image, probs, **PARAMS)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.all(q >= 0)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


def test_crf_smooths_towards_the_object() -> None:
    image, probs = _scene()
    q = dense_crf(image, probs, **PARAMS)
    inside = np.zeros(image.shape[:2], bool)
    inside[6:18, 6:18] = True
    before = np.mean((probs.argmax(0) == 1) == inside)
    after = np.mean((q.argmax(0) == 1) == inside)
    assert after > before


def test_works_on_read_only_and_strided_inputs() -> None:
    image, probs = _scene()
    expected = dense_crf(image, probs, **PARAMS)
    ro_image = image.copy()
    ro_probs = probs.copy()
    ro_image.setflags(write=False)
    ro_probs.setflags(write=False)
    np.testing.assert_allclose(dense_crf(ro_image, ro_probs, **PARAMS), expected, atol=1e-6)
    # Fortran-ordered / transposed views are not C-contiguous.
    strided = np.asfortranarray(image)
    np.testing.assert_allclose(dense_crf(strided, probs, **PARAMS), expected, atol=1e-6)


def test_zero_iterations_is_the_normalised_unary() -> None:
    image, probs = _scene()
    q = dense_crf(image, probs, **{**PARAMS, "iterations": 0})
    np.testing.assert_allclose(q, probs / probs.sum(0), atol=1e-5)


@pytest.mark.parametrize(
    ("image", "probs", "match"),
    [
        (np.zeros((4, 4, 3), np.float32), np.ones((2, 4, 4), np.float32), "uint8"),
        (np.zeros((4, 4), np.uint8), np.ones((2, 4, 4), np.float32), "H x W x 3"),
        (np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 5), np.float32), "K x H x W"),
        (np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 4), np.int64), "float"),
        (np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), np.nan, np.float32), "finite"),
        (np.zeros((4, 4, 3), np.uint8), -np.ones((2, 4, 4), np.float32), "non-negative"),
    ],
)
def test_validation(image: np.ndarray, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dense_crf(image, probs, **PARAMS)


def test_crf_inference_validates_unary() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="nodes"):
        crf_inference(image, np.zeros((2, 15), np.float32), **PARAMS)
    with pytest.raises(ValueError, match="non-finite"):
        crf_inference(image, np.full((2, 16), np.inf, np.float32), **PARAMS)
    with pytest.raises(ValueError, match="iterations"):
        crf_inference(image, np.zeros((2, 16), np.float32), **{**PARAMS, "iterations": -1})


def _with_absent_classes(probs: np.ndarray, k: int, absent_p: float) -> np.ndarray:
    """Embed 3-class probabilities into k classes; the k - 3 extra ones get absent_p."""
    full = np.full((k,) + probs.shape[1:], absent_p, np.float32)
    full[:3] = probs * (1 - (k - 3) * absent_p)
    return full


def test_restriction_matches_full_crf_when_absent_classes_have_no_mass() -> None:
    image, probs = _scene()
    k = 21
    mask = np.zeros(k, bool)
    mask[:3] = True
    for absent_p in (0.0, 1e-6, 0.9e-4):
        full_probs = _with_absent_classes(probs, k, absent_p)
        np.testing.assert_array_equal(crf_labels(full_probs, mask), mask)
        restricted = boundary_crf_target(image, full_probs, mask)
        full = boundary_crf_target(image, full_probs, None)
        assert np.all(restricted[~mask] == 0)
        np.testing.assert_allclose(restricted.sum(0), 1.0, atol=1e-5)
        # O(K_absent * floor) = 18e-4 bound from restriction_is_exact's docstring.
        assert np.abs(restricted - full).max() < 2e-3


def test_absent_classes_with_mass_are_kept() -> None:
    image, probs = _scene()
    k = 21
    mask = np.zeros(k, bool)
    mask[:3] = True
    full_probs = _with_absent_classes(probs, k, 0.5e-4)
    # One absent class the model predicts over a distinct green region: the full CRF keeps it,
    # and so does the restricted one; the 17 classes at the floor are dropped.
    image[0:6, 0:6] = (20, 200, 20)
    full_probs[4, 0:6, 0:6] = 0.95
    full_probs /= full_probs.sum(0)
    keep = crf_labels(full_probs, mask)
    assert keep.sum() == 4 and keep[4]
    q = boundary_crf_target(image, full_probs, mask)
    full = boundary_crf_target(image, full_probs, None)
    assert np.all(q[~keep] == 0) and q[4, 0:6, 0:6].min() > 0.5
    assert np.abs(q - full).max() < 2e-3
    # Mass on every absent class: nothing can be dropped, the full CRF runs.
    spread = _with_absent_classes(probs, 6, 1e-3)
    small = mask[:6]
    assert crf_labels(spread, small).all()
    np.testing.assert_array_equal(
        boundary_crf_target(image, spread, small), boundary_crf_target(image, spread, None)
    )
    # A tolerance above the absent mass drops them (no longer exact).
    forced = boundary_crf_target(image, spread, small, absent_tolerance=1.0)
    assert np.all(forced[~small] == 0)


def test_batch_targets_are_picklable_and_match_single_calls() -> None:
    images = np.stack([_scene(seed=s)[0] for s in range(2)])
    probs = np.stack([_scene(seed=s)[1] for s in range(2)])
    masks = np.array([[True, True, False], [True, True, True]])
    fn = pickle.loads(pickle.dumps(boundary_crf_targets))
    out = fn(images, probs, masks, iterations=3)
    assert out.shape == probs.shape and out.dtype == np.float32
    for i in range(2):
        np.testing.assert_array_equal(
            out[i], boundary_crf_target(images[i], probs[i], masks[i], iterations=3)
        )
    with pytest.raises(ValueError, match="class_masks"):
        boundary_crf_targets(images, probs, masks[:, :2])
    with pytest.raises(ValueError, match="no class"):
        boundary_crf_target(images[0], probs[0], np.zeros(3, bool))
