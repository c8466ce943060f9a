"""The boundary-CRF process pool returns exactly what a direct call returns."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.train.crf_pool import CRFPool, crf_params
from weakclip.config import BOUNDARY_CRF
from weakclip.crf import boundary_crf_targets

PARAMS = crf_params(BOUNDARY_CRF, prob_floor=1e-4)


def _batch(batch: int = 5, classes: int = 4, size: int = 16) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    logits = rng.normal(size=(batch, classes, size, size)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    masks = np.ones((batch, classes), dtype=bool)
    masks[:, 2] = False  # an absent class with real mass: the CRF must fall back to all
    masks[0, 3] = False
    # Image 1 has an absent class at ~0 probability: the restricted CRF is exact there.
    probs[1, 2] = 0.0
    probs[1] /= probs[1].sum(axis=0, keepdims=True)
    return images, probs.astype(np.float32), masks


@pytest.mark.parametrize("processes", [0, 2, 8])
def test_pool_matches_direct_call(processes: int) -> None:
    images, probs, masks = _batch()
    expected = boundary_crf_targets(images, probs, masks, **PARAMS)
    with CRFPool(processes=processes, params=PARAMS) as pool:
        pending = pool.submit(images, probs, masks)
        q = pool.result(pending)
        # A second batch through the same processes.
        q2 = pool.result(pool.submit(images[:1], probs[:1], None))
    np.testing.assert_array_equal(q, expected)
    np.testing.assert_array_equal(q2, boundary_crf_targets(images[:1], probs[:1], None, **PARAMS))
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
    assert pool.wait_seconds >= 0 and pool.compute_seconds >= pool.wait_seconds


def test_pool_propagates_errors_and_validates() -> None:
    images, probs, masks = _batch()
    with CRFPool(processes=1, params=PARAMS) as pool:
        with pytest.raises(ValueError, match="class_masks shape"):
            pool.result(pool.submit(images, probs, masks[:, :2]))
    with pytest.raises(ValueError, match="processes"):
        CRFPool(processes=-1, params=PARAMS)
