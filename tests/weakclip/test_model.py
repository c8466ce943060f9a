"""Tests for the WeakCLIP composition, with small stand-in encoders that follow CLIP's interface."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from weakclip.co_attention import CoAttentionMatching
from weakclip.decoder import TextGuidedDecoder
from weakclip.model import WeakCLIP, WeakCLIPOutput
from weakclip.pyramid_adapter import PyramidAdapter

PATCH = 16  # as ViT-B/16, so the decoder's output is at 1/4 of the input
WIDTH = 8  # C
EMBED_DIM = 16  # D


class FakeFeatures(NamedTuple):
    taps: tuple[torch.Tensor, ...]
    global_embedding: torch.Tensor
    dense_embedding: torch.Tensor


class FakeImageEncoder(nn.Module):
    """A frozen patch convolution standing in for CLIP's ViT; runs without gradients like it."""

    def __init__(self) -> None:
        super().__init__()
        self.width = WIDTH
        self.embed_dim = EMBED_DIM
        self.patch_size = PATCH
        self.patch_embed = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH)
        self.taps = nn.ModuleList(nn.Conv2d(WIDTH, WIDTH, kernel_size=1) for _ in range(4))
        self.proj = nn.Conv2d(WIDTH, EMBED_DIM, kernel_size=1)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> FakeFeatures:
        with torch.no_grad():
            x = self.patch_embed(images)  # B x C x h x w
            taps = tuple(torch.tanh(tap(x)) for tap in self.taps)
            dense = self.proj(x)  # B x D x h x w
            return FakeFeatures(taps, dense.mean(dim=(2, 3)), dense)


class FakeTextEncoder(nn.Module):
    """Frozen per-class embeddings moved by a learnable context through a frozen projection."""

    def __init__(self, class_names: tuple[str, ...]) -> None:
        super().__init__()
        self.class_names = class_names
        self.class_embedding = nn.Parameter(
            torch.randn(len(class_names), EMBED_DIM), requires_grad=False
        )
        self.projection = nn.Linear(EMBED_DIM, EMBED_DIM).requires_grad_(False)
        self.context = nn.Parameter(torch.randn(EMBED_DIM))

    def forward(self) -> torch.Tensor:
        return self.projection(self.class_embedding + self.context)  # K x D


def _model(classes: int, *, adapter_trainable: bool = True) -> WeakCLIP:
    return WeakCLIP(
        image_encoder=FakeImageEncoder(),
        text_encoder=FakeTextEncoder(tuple(f"class{k}" for k in range(classes))),
        adapter=PyramidAdapter(channels=WIDTH, trainable=adapter_trainable),
        co_attention=CoAttentionMatching(
            embed_dim=EMBED_DIM,
            width=8,
            heads=2,
            layers=2,
            dropout=0.1,
            mlp_ratio=2,
            temperature_init=0.1,
        ),
        decoder=TextGuidedDecoder(
            in_channels=WIDTH, num_classes=classes, width=8, head_blocks=(1, 1, 2, 3), dropout=0.0
        ),
        tau=0.07,
    )


@pytest.mark.parametrize(("height", "width"), [(64, 64), (80, 112)])
@pytest.mark.parametrize("classes", [3, 21])
def test_output_shapes(classes: int, height: int, width: int) -> None:
    output = _model(classes)(torch.randn(2, 3, height, width))
    assert isinstance(output, WeakCLIPOutput)
    assert output.logits.shape == (2, classes, height // 4, width // 4)
    assert output.score_map.shape == (2, classes, height // PATCH, width // PATCH)
    assert output.text_embeddings.shape == (2, classes, EMBED_DIM)
    assert output.score_map.abs().max() <= 1 + 1e-6


def test_trainable_parameters_get_gradients_and_frozen_ones_none() -> None:
    model = _model(3).train()
    output = model(torch.randn(2, 3, 96, 80))
    loss = (output.logits * torch.randn_like(output.logits)).sum()
    loss = loss + (output.score_map / model.tau * torch.randn_like(output.score_map)).sum()
    loss.backward()
    frozen = {
        id(p) for p in [*model.image_encoder.parameters(), model.text_encoder.class_embedding]
    }
    frozen |= {id(p) for p in model.text_encoder.projection.parameters()}
    for name, parameter in model.named_parameters():
        if id(parameter) in frozen:
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert model.text_encoder.context.grad is not None


def test_trainable_parameters_exclude_frozen_parts() -> None:
    model = _model(3)
    trainable = {id(p) for p in model.trainable_parameters()}
    expected = {
        id(p)
        for part in (model.adapter, model.co_attention, model.decoder)
        for p in part.parameters()
    }
    expected.add(id(model.text_encoder.context))
    assert trainable == expected

    frozen_adapter = _model(3, adapter_trainable=False)
    adapter_ids = {id(p) for p in frozen_adapter.adapter.parameters()}
    assert adapter_ids.isdisjoint(id(p) for p in frozen_adapter.trainable_parameters())


def test_score_map_matches_the_co_attended_embeddings() -> None:
    model = _model(3).eval()
    images = torch.randn(1, 3, 48, 32)
    output = model(images)
    features = model.image_encoder(images)
    _, dense, text = model.co_attention(
        features.global_embedding, features.dense_embedding, model.text_encoder()
    )
    expected = torch.nn.functional.cosine_similarity(
        dense.unsqueeze(1), text[:, :, :, None, None], dim=2
    )
    torch.testing.assert_close(output.score_map, expected)
    torch.testing.assert_close(output.text_embeddings, text)


def test_exposes_tau_and_class_names() -> None:
    model = _model(3)
    assert model.tau == 0.07
    assert model.class_names == ("class0", "class1", "class2")


def test_rejects_bad_tau_and_images() -> None:
    parts = _model(3)
    with pytest.raises(ValueError, match="tau"):
        WeakCLIP(
            image_encoder=parts.image_encoder,
            text_encoder=parts.text_encoder,
            adapter=parts.adapter,
            co_attention=parts.co_attention,
            decoder=parts.decoder,
            tau=0.0,
        )
    with pytest.raises(ValueError, match="images"):
        parts(torch.randn(2, 1, 64, 64))


def test_trainable_parameter_budget_at_paper_settings() -> None:
    # ViT-B/16 (C=768, D=512), K=21, co-attention 256-d x 4 heads x 3 layers, decoder 256-d:
    # the paper's table gives 21.2M trainable; 4096 are the 8 x 512 prompt context vectors.
    adapter = PyramidAdapter(channels=768)
    co_attention = CoAttentionMatching(
        embed_dim=512,
        width=256,
        heads=4,
        layers=3,
        dropout=0.1,
        mlp_ratio=4,
        temperature_init=0.1,
    )
    decoder = TextGuidedDecoder(
        in_channels=768, num_classes=21, width=256, head_blocks=(1, 1, 2, 3), dropout=0.1
    )
    counts = [sum(p.numel() for p in m.parameters()) for m in (adapter, co_attention, decoder)]
    assert counts == [7_087_872, 6_841_856, 7_307_029]
    assert abs(sum(counts) + 8 * 512 - 21.2e6) / 21.2e6 < 0.01
