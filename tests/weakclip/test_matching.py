"""Tests for text-to-pixel matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weakclip.matching import text_to_pixel_scores


def test_known_values() -> None:
    # Pixels (1, 0), (1, 1), (-2, 0), (0, 3) against classes (1, 0) and (0, 1).
    dense = torch.tensor([[1.0, 1.0, -2.0, 0.0], [0.0, 1.0, 0.0, 3.0]]).reshape(1, 2, 2, 2)
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    half = 1 / math.sqrt(2)
    expected = torch.tensor([[[1.0, half], [-1.0, 0.0]], [[0.0, half], [0.0, 1.0]]])
    torch.testing.assert_close(text_to_pixel_scores(dense, text), expected.unsqueeze(0))


@pytest.mark.parametrize(("classes", "height", "width"), [(3, 4, 4), (21, 3, 5)])
def test_shape_range_and_agreement_with_cosine_similarity(
    classes: int, height: int, width: int
) -> None:
    dense = torch.randn(2, 16, height, width) * 5
    text = torch.randn(2, classes, 16) * 3
    scores = text_to_pixel_scores(dense, text)
    assert scores.shape == (2, classes, height, width)
    assert scores.min() >= -1 - 1e-6 and scores.max() <= 1 + 1e-6
    reference = F.cosine_similarity(dense.unsqueeze(1), text[:, :, :, None, None], dim=2)
    torch.testing.assert_close(scores, reference)


def test_invariant_to_positive_scale_of_either_embedding() -> None:
    dense = torch.randn(2, 8, 3, 4)
    text = torch.randn(2, 5, 8)
    scores = text_to_pixel_scores(dense, text)
    pixel_scale = torch.rand(2, 1, 3, 4) * 10 + 0.1
    class_scale = torch.rand(2, 5, 1) * 10 + 0.1
    torch.testing.assert_close(
        text_to_pixel_scores(dense * pixel_scale, text * class_scale), scores
    )
    torch.testing.assert_close(text_to_pixel_scores(-dense, text), -scores)


def test_zero_embedding_scores_zero_not_nan() -> None:
    scores = text_to_pixel_scores(torch.zeros(1, 4, 2, 2), torch.randn(1, 3, 4))
    assert torch.equal(scores, torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize(
    ("dense", "text"),
    [
        (torch.randn(2, 8, 3, 3), torch.randn(1, 4, 8)),
        (torch.randn(2, 8, 3, 3), torch.randn(2, 4, 7)),
        (torch.randn(2, 8, 3, 3), torch.randn(4, 8)),
    ],
    ids=["batch", "width", "unbatched-text"],
)
def test_rejects_mismatched_shapes(dense: torch.Tensor, text: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        text_to_pixel_scores(dense, text)
