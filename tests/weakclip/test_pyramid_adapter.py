"""Tests for the pyramid adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakclip.pyramid_adapter import PyramidAdapter

CHANNELS = 8


def _taps(batch: int, height: int, width: int, requires_grad: bool = False) -> list[torch.Tensor]:
    return [
        torch.randn(batch, CHANNELS, height, width, requires_grad=requires_grad) for _ in range(4)
    ]


@pytest.mark.parametrize(("height", "width"), [(4, 4), (5, 7)])
def test_output_shapes(height: int, width: int) -> None:
    adapter = PyramidAdapter(channels=CHANNELS)
    levels = adapter(_taps(2, height, width))
    assert [tuple(level.shape) for level in levels] == [
        (2, CHANNELS, 4 * height, 4 * width),
        (2, CHANNELS, 2 * height, 2 * width),
        (2, CHANNELS, height, width),
        (2, CHANNELS, height // 2, width // 2),
    ]


def test_levels_three_and_four_are_normalised_taps() -> None:
    # At init GroupNorm is the identity affine, so level 3 is the normalised tap and level 4
    # its 2x2 max-pool: checks that each level reads its own tap.
    adapter = PyramidAdapter(channels=CHANNELS).eval()
    taps = _taps(2, 6, 4)
    levels = adapter(taps)
    torch.testing.assert_close(levels[2], F.group_norm(taps[2], 1))
    torch.testing.assert_close(levels[3], F.max_pool2d(F.group_norm(taps[3], 1), 2))


def test_every_parameter_gets_a_gradient() -> None:
    adapter = PyramidAdapter(channels=CHANNELS)
    levels = adapter(_taps(2, 4, 6))
    loss = sum((level * torch.randn_like(level)).sum() for level in levels)
    loss.backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.requires_grad, name
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_frozen_adapter_gets_no_gradient_but_passes_one_through() -> None:
    adapter = PyramidAdapter(channels=CHANNELS, trainable=False)
    taps = _taps(2, 4, 4, requires_grad=True)
    levels = adapter(taps)
    sum(level.sum() for level in levels).backward()
    assert all(not p.requires_grad and p.grad is None for p in adapter.parameters())
    assert all(tap.grad is not None for tap in taps)


@pytest.mark.parametrize(
    "taps",
    [
        [torch.randn(1, CHANNELS, 4, 4)] * 3,
        [torch.randn(1, CHANNELS + 1, 4, 4)] * 4,
        [torch.randn(1, CHANNELS, 1, 4)] * 4,
    ],
    ids=["three-taps", "wrong-channels", "too-small"],
)
def test_rejects_bad_taps(taps: list[torch.Tensor]) -> None:
    with pytest.raises(ValueError):
        PyramidAdapter(channels=CHANNELS)(taps)
