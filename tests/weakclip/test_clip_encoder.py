"""The frozen CLIP image encoder: shapes, position-embedding resizing, parity, freezing."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP
from torch import nn

from weakclip.build import build_clip
from weakclip.clip_encoder import CLIPImageEncoder
from weakclip.config import preset

TINY = preset("tiny").clip
assert TINY.custom is not None
PATCH = TINY.custom.patch_size
STORED_GRID = TINY.custom.image_size // PATCH  # grid of the checkpoint's position embedding


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return build_clip(TINY).eval()


def tiny_encoder(input_size: int = 256) -> CLIPImageEncoder:
    return CLIPImageEncoder(
        visual=tiny_clip().visual, input_size=input_size, tap_layers=TINY.tap_layers
    )


@pytest.mark.parametrize("size", [(256, 256), (192, 320), (100, 70)])
def test_shapes(size: tuple[int, int]) -> None:
    encoder = tiny_encoder()
    height, width = size
    features = encoder(torch.randn(2, 3, height, width))
    h, w = height // PATCH, width // PATCH
    assert len(features.taps) == 4
    for tap in features.taps:
        assert tap.shape == (2, encoder.width, h, w)
    assert features.global_embedding.shape == (2, encoder.embed_dim)
    assert features.dense_embedding.shape == (2, encoder.embed_dim, h, w)
    assert (encoder.width, encoder.embed_dim, encoder.patch_size) == (
        TINY.custom.vision_width,
        TINY.custom.embed_dim,
        PATCH,
    )


def test_matches_open_clip_at_the_checkpoint_grid() -> None:
    clip = tiny_clip()
    images = torch.randn(2, 3, TINY.custom.image_size, TINY.custom.image_size)
    with torch.no_grad():
        expected_global = clip.encode_image(images)
        out = clip.visual.forward_intermediates(images, indices=[3])
        expected_last_tap = out["image_intermediates"][0]
    encoder = CLIPImageEncoder(
        visual=clip.visual, input_size=TINY.custom.image_size, tap_layers=TINY.tap_layers
    )
    features = encoder(images)
    torch.testing.assert_close(features.global_embedding, expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.taps[-1], expected_last_tap, rtol=1e-5, atol=1e-5)
    # The dense embedding is every patch token through ln_post and proj, as the class token is.
    tokens = expected_last_tap.flatten(2).transpose(1, 2)
    dense = clip.visual.ln_post(tokens) @ clip.visual.proj
    torch.testing.assert_close(
        features.dense_embedding.flatten(2).transpose(1, 2), dense, rtol=1e-5, atol=1e-5
    )


def _ramp_embedding(grid: int, width: int) -> torch.Tensor:
    """Patch (i, j) holds i in channel 0 and j in channel 1; the class row holds -7."""
    rows = torch.arange(grid, dtype=torch.float32).repeat_interleave(grid)
    cols = torch.arange(grid, dtype=torch.float32).repeat(grid)
    embedding = torch.zeros(1 + grid * grid, width)
    embedding[0] = -7.0
    embedding[1:, 0] = rows
    embedding[1:, 1] = cols
    return embedding


def test_position_embedding_is_resized_bilinearly_at_load() -> None:
    clip = tiny_clip()
    width = clip.visual.conv1.out_channels
    with torch.no_grad():
        clip.visual.positional_embedding.copy_(_ramp_embedding(STORED_GRID, width))
    encoder = CLIPImageEncoder(visual=clip.visual, input_size=256, tap_layers=TINY.tap_layers)
    grid = 256 // PATCH
    assert encoder.grid_size == (grid, grid)
    stored = encoder.visual.positional_embedding
    assert stored.shape == (1 + grid * grid, width)
    assert torch.all(stored[0] == _ramp_embedding(STORED_GRID, width)[0])
    rows = stored[1:, 0].reshape(grid, grid)
    cols = stored[1:, 1].reshape(grid, grid)
    # Row coordinate varies down the grid only and the column coordinate across it only.
    assert torch.allclose(rows, rows[:, :1].expand_as(rows))
    assert torch.allclose(cols, cols[:1, :].expand_as(cols))
    assert torch.all(rows[1:, 0] >= rows[:-1, 0]) and torch.all(cols[0, 1:] >= cols[0, :-1])
    # Bilinear with align_corners=False: the interior of a 2x upsampled ramp steps by 1/2.
    assert torch.allclose(rows[2:-1, 0] - rows[1:-2, 0], torch.full((grid - 3,), 0.5))
    assert rows[0, 0] == 0 and rows[-1, 0] == STORED_GRID - 1


def test_position_embedding_follows_the_forward_grid_and_weight_updates() -> None:
    encoder = tiny_encoder()
    grid = 256 // PATCH
    assert encoder.positional_embedding_for((grid, grid)) is encoder.visual.positional_embedding
    non_square = encoder.positional_embedding_for((12, 20))
    assert non_square.shape == (1 + 12 * 20, encoder.width)
    assert encoder.positional_embedding_for((12, 20)) is non_square  # cached

    images = torch.randn(1, 3, 12 * PATCH, 20 * PATCH)
    before = encoder(images).global_embedding
    with torch.no_grad():
        encoder.visual.positional_embedding.add_(1.0)  # as load_state_dict would
    refreshed = encoder.positional_embedding_for((12, 20))
    assert refreshed is not non_square
    torch.testing.assert_close(refreshed[1:], non_square[1:] + 1.0)
    assert not torch.allclose(encoder(images).global_embedding, before)


def test_frozen_and_without_graph() -> None:
    encoder = tiny_encoder()
    assert all(not p.requires_grad for p in encoder.parameters())
    images = torch.randn(1, 3, 64, 64, requires_grad=True)
    features = encoder(images)
    assert not features.global_embedding.requires_grad
    assert not features.dense_embedding.requires_grad
    assert not any(tap.requires_grad for tap in features.taps)


def test_unfrozen_by_a_probe_builds_a_graph() -> None:
    encoder = tiny_encoder().requires_grad_(True)  # as clip.train_image_encoder does
    features = encoder(torch.randn(1, 3, 64, 64))
    features.taps[-1].sum().backward()
    assert encoder.visual.conv1.weight.grad is not None
    with torch.no_grad():
        assert not encoder(torch.randn(1, 3, 64, 64)).taps[0].requires_grad


def test_stays_in_eval_mode_inside_a_training_parent() -> None:
    encoder = tiny_encoder()
    parent = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(module.training for module in encoder.modules())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tap_layers"):
        CLIPImageEncoder(visual=tiny_clip().visual, input_size=256, tap_layers=(1, 2, 3, 5))
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="at least"):
        encoder(torch.randn(1, 3, PATCH - 1, 64))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        encoder(torch.randn(3, 64, 64))


def test_class_embedding_twice_is_the_released_compensation() -> None:
    # D1: the released ViT's CLS token is 2 e_cls + pos_0, i.e. e_cls + (pos_0 + e_cls).
    images = torch.randn(2, 3, 256, 256)
    twice = CLIPImageEncoder(
        visual=tiny_clip().visual,
        input_size=256,
        tap_layers=TINY.tap_layers,
        class_embedding_twice=True,
    )
    compensated = tiny_encoder()
    with torch.no_grad():
        compensated.visual.positional_embedding[0] += compensated.visual.class_embedding
        expected, got, plain = compensated(images), twice(images), tiny_encoder()(images)
    torch.testing.assert_close(got.global_embedding, expected.global_embedding)
    torch.testing.assert_close(got.dense_embedding, expected.dense_embedding)
    assert not torch.allclose(got.global_embedding, plain.global_embedding, rtol=1e-3, atol=0)


def test_drop_path_acts_only_while_training() -> None:
    # D7: stochastic depth in training mode, none in eval mode, none at rate 0.
    images = torch.randn(4, 3, 64, 64)

    def encoder(rate: float) -> CLIPImageEncoder:
        return CLIPImageEncoder(
            visual=tiny_clip().visual,
            input_size=64,
            tap_layers=TINY.tap_layers,
            drop_path_rate=rate,
        )

    dropping, still = encoder(0.5), encoder(0.0)
    reference = still(images).dense_embedding
    torch.manual_seed(0)
    dropping.train()
    first, second = dropping(images).dense_embedding, dropping(images).dense_embedding
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, reference)
    dropping.eval()
    torch.testing.assert_close(dropping(images).dense_embedding, reference)
    still.train()
    torch.testing.assert_close(still(images).dense_embedding, reference)
    assert dropping.drop_path_rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
