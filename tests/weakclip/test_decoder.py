"""Tests for the text-guided decoder."""

from __future__ import annotations

import pytest
import torch

from weakclip.decoder import TextGuidedDecoder

CHANNELS = 8


def _decoder(classes: int, dropout: float = 0.1) -> TextGuidedDecoder:
    return TextGuidedDecoder(
        in_channels=CHANNELS,
        num_classes=classes,
        width=8,
        head_blocks=(1, 1, 2, 3),
        dropout=dropout,
    )


def _levels(batch: int, height: int, width: int) -> list[torch.Tensor]:
    """Levels as the adapter makes them from an h x w patch grid: 4h, 2h, h, floor(h/2)."""
    sizes = [(4 * height, 4 * width), (2 * height, 2 * width), (height, width)]
    sizes.append((height // 2, width // 2))
    return [torch.randn(batch, CHANNELS, h, w, requires_grad=True) for h, w in sizes]


# (5, 7): the 1/32 level is 2 x 3, so x2 upsampling does not reach the 1/16 level's 5 x 7.
@pytest.mark.parametrize(("height", "width"), [(4, 4), (5, 7)])
@pytest.mark.parametrize("classes", [3, 21])
def test_logits_at_the_finest_level(classes: int, height: int, width: int) -> None:
    levels = _levels(2, height, width)
    logits = _decoder(classes)(levels, torch.randn(2, classes, height, width))
    assert logits.shape == (2, classes, 4 * height, 4 * width)


def test_score_map_of_any_resolution_is_resized() -> None:
    logits = _decoder(3)(_levels(1, 4, 6), torch.randn(1, 3, 2, 9))
    assert logits.shape == (1, 3, 16, 24)


def test_every_parameter_and_every_input_gets_a_gradient() -> None:
    decoder = _decoder(3, dropout=0.0).train()
    levels = _levels(2, 5, 3)
    score_map = torch.randn(2, 3, 5, 3, requires_grad=True)
    logits = decoder(levels, score_map)
    (logits * torch.randn_like(logits)).sum().backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    for index, level in enumerate([*levels, score_map]):
        assert level.grad is not None and level.grad.abs().sum() > 0, index


def test_batch_elements_are_independent_in_eval_mode() -> None:
    decoder = _decoder(3).eval()
    levels = _levels(2, 4, 4)
    score_map = torch.randn(2, 3, 4, 4)
    both = decoder(levels, score_map)
    first = decoder([level[:1] for level in levels], score_map[:1])
    torch.testing.assert_close(both[:1], first)


def test_trainable_parameter_count_at_paper_settings() -> None:
    decoder = TextGuidedDecoder(
        in_channels=768, num_classes=21, width=256, head_blocks=(1, 1, 2, 3), dropout=0.1
    )
    laterals = 4 * ((768 + 21) * 256 + 256)
    fpn_convs = 4 * (256 * 256 * 9 + 256)
    head = 7 * (256 * 256 * 9 + 2 * 256)
    classifier = 256 * 21 + 21
    assert sum(p.numel() for p in decoder.parameters()) == laterals + fpn_convs + head + classifier


def test_rejects_bad_inputs() -> None:
    decoder = _decoder(3)
    levels = _levels(2, 4, 4)
    with pytest.raises(ValueError):
        decoder(levels[:3], torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError):
        decoder(levels, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError):
        decoder(levels, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError):
        decoder([torch.randn(2, CHANNELS + 1, 4, 4)] * 4, torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("head_blocks", [(1, 1, 2), (1, 0, 2, 3)])
def test_rejects_bad_head_blocks(head_blocks: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="head_blocks"):
        TextGuidedDecoder(
            in_channels=CHANNELS, num_classes=3, width=8, head_blocks=head_blocks, dropout=0.1
        )


def test_upsampling_by_two_matches_exact_sizes_only_on_even_grids() -> None:
    # D2: the released head's x2 steps reach the exact sizes when the grid is a multiple of 8.
    def both(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        exact = _decoder(3).eval()
        steps = _decoder(3).eval()
        steps.load_state_dict(exact.state_dict())
        steps.upsample_by_two = True
        levels, score = _levels(1, height, width), torch.randn(1, 3, height, width)
        with torch.no_grad():
            return exact(levels, score), steps(levels, score)

    exact, steps = both(8, 16)
    torch.testing.assert_close(steps, exact)
    exact, steps = both(7, 9)
    assert exact.shape == steps.shape == (1, 3, 28, 36)
    assert not torch.allclose(steps, exact, atol=1e-4)


def test_default_init_leaves_the_classifier_as_pytorch_makes_it() -> None:
    # D8: the released code never calls init_weights: its classifier is U(+-1/sqrt(fan_in)),
    # not N(0, 0.01).
    torch.manual_seed(0)
    ours = TextGuidedDecoder(
        in_channels=CHANNELS, num_classes=21, width=64, head_blocks=(1, 1, 2, 3), dropout=0.1
    )
    released = TextGuidedDecoder(
        in_channels=CHANNELS,
        num_classes=21,
        width=64,
        head_blocks=(1, 1, 2, 3),
        dropout=0.1,
        default_init=True,
    )
    weight, bias = ours.classifier.weight.detach(), ours.classifier.bias.detach()
    assert float(weight.std()) == pytest.approx(0.01, rel=0.1) and float(bias.abs().max()) == 0
    weight, bias = released.classifier.weight.detach(), released.classifier.bias.detach()
    assert float(weight.abs().max()) <= 1 / 64**0.5 and float(weight.std()) > 0.05
    assert float(bias.abs().max()) > 0.0
