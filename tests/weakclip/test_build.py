"""The builder: the tiny model end to end, gradient routing and CLIP weight files."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from weakclip.build import (
    build_clip,
    build_weakclip,
    clip_weights_digest,
    save_clip_weights,
)
from weakclip.config import AdapterConfig, CustomCLIPConfig, preset
from weakclip.model import WeakCLIP

TINY = preset("tiny")
VOC_NAMES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()


@pytest.fixture(scope="module", params=[3, 21], ids=["K3", "K21"])
def tiny_model(request: pytest.FixtureRequest) -> WeakCLIP:
    torch.manual_seed(0)
    return build_weakclip(TINY, VOC_NAMES[: request.param])


def _clip_parameter_names(model: WeakCLIP) -> set[str]:
    names = {f"image_encoder.{n}" for n, _ in model.image_encoder.named_parameters()}
    names |= {f"text_encoder.{n}" for n, _ in model.text_encoder.named_parameters()}
    return names - {"text_encoder.context"}


def test_train_image_encoder_trains_the_image_tower_only() -> None:
    assert not TINY.clip.train_image_encoder and not preset("vit-b-16").clip.train_image_encoder
    torch.manual_seed(0)
    config = dataclasses.replace(
        TINY, clip=dataclasses.replace(TINY.clip, train_image_encoder=True)
    )
    model = build_weakclip(config, VOC_NAMES[:3])
    out = model(torch.randn(2, 3, 64, 64))
    (out.logits.square().mean() + out.score_map.square().mean()).backward()
    for name, parameter in model.image_encoder.named_parameters():
        assert parameter.requires_grad and parameter.grad is not None, name
    text = [n for n, p in model.text_encoder.named_parameters() if p.requires_grad]
    assert text == ["context"]
    assert not model.image_encoder.training  # no dropout or BatchNorm to switch


@pytest.mark.parametrize("size", [(256, 256), (192, 320)])
def test_output_shapes(tiny_model: WeakCLIP, size: tuple[int, int]) -> None:
    height, width = size
    num_classes = len(tiny_model.class_names)
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(torch.randn(2, 3, height, width))
    assert out.logits.shape == (2, num_classes, height // 4, width // 4)
    assert out.score_map.shape == (2, num_classes, height // 16, width // 16)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.score_map).all()


def test_gradients_reach_every_trainable_parameter_and_no_clip_weight(
    tiny_model: WeakCLIP,
) -> None:
    tiny_model.train()
    tiny_model.zero_grad(set_to_none=True)
    images = torch.randn(2, 3, 192, 256)
    out = tiny_model(images)
    target = torch.randint(0, len(tiny_model.class_names), (2, 192, 256))
    logits = F.interpolate(out.logits, size=target.shape[-2:], mode="bilinear")
    scores = F.interpolate(out.score_map / 0.07, size=target.shape[-2:], mode="bilinear")
    (F.cross_entropy(logits, target) + 0.4 * F.cross_entropy(scores, target)).backward()

    clip_names = _clip_parameter_names(tiny_model)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable.isdisjoint(clip_names)
    assert "text_encoder.context" in trainable
    assert {p for p in tiny_model.trainable_parameters()} == {
        p for n, p in tiny_model.named_parameters() if n in trainable
    }
    for name, parameter in tiny_model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    assert not tiny_model.image_encoder.training


def test_frozen_adapter_reproduces_the_released_code() -> None:
    config = dataclasses.replace(TINY, adapter=AdapterConfig(channels=128, trainable=False))
    model = build_weakclip(config, VOC_NAMES[:2])
    assert not any(p.requires_grad for p in model.adapter.parameters())
    assert any(p.requires_grad for p in model.decoder.parameters())


def test_clip_weights_reach_the_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    clip = build_clip(TINY.clip)
    path = tmp_path / "clip.safetensors"
    save_clip_weights(clip, path, "safetensors")
    model = build_weakclip(TINY, VOC_NAMES[:3], clip_weights=path)
    text = model.text_encoder
    assert torch.equal(text.token_embedding.weight, clip.token_embedding.weight)
    assert torch.equal(text.positional_embedding, clip.positional_embedding[:13])
    visual = model.image_encoder.visual
    assert torch.equal(visual.conv1.weight, clip.visual.conv1.weight)
    assert torch.equal(visual.positional_embedding[0], clip.visual.positional_embedding[0])
    assert visual.positional_embedding.shape[0] == 1 + (256 // 16) ** 2


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [
        ("state_dict", ".bin"),
        ("state_dict", ".pt"),
        ("safetensors", ".safetensors"),
        ("torchscript", ".pt"),
    ],
)
def test_weight_files_load_back_bit_identical(tmp_path: Path, fmt: str, suffix: str) -> None:
    torch.manual_seed(4)
    clip = build_clip(TINY.clip)
    path = tmp_path / f"clip{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
        save_clip_weights(clip, path, fmt)  # type: ignore[arg-type]
        loaded = build_clip(TINY.clip, clip_weights=str(path)).state_dict()
    expected = clip.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert clip_weights_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_openai_style_half_precision_state_dict_loads(tmp_path: Path) -> None:
    torch.manual_seed(5)
    clip = build_clip(TINY.clip)
    state = {f"module.{k}": v.half() for k, v in clip.state_dict().items()}
    state.update(input_resolution=torch.tensor(128), context_length=torch.tensor(77))
    path = tmp_path / "openai_like.pt"
    torch.save({"state_dict": state}, path)
    loaded = build_clip(TINY.clip, clip_weights=path)
    assert loaded.visual.conv1.weight.dtype == torch.float32
    assert torch.equal(loaded.visual.conv1.weight, clip.visual.conv1.weight.half().float())


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    wider = dataclasses.replace(
        TINY.clip, custom=dataclasses.replace(TINY.clip.custom, text_width=128)
    )
    path = tmp_path / "wider.safetensors"
    save_clip_weights(build_clip(wider), path, "safetensors")
    with pytest.raises(ValueError, match="shape"):
        build_clip(TINY.clip, clip_weights=path)
    deeper = dataclasses.replace(
        TINY.clip, custom=CustomCLIPConfig(vision_layers=5), tap_layers=(1, 2, 3, 5)
    )
    path = tmp_path / "deeper.bin"
    save_clip_weights(build_clip(deeper), path, "state_dict")
    with pytest.raises(ValueError, match="unexpected.*resblocks.4"):
        build_clip(TINY.clip, clip_weights=path)


class _Payload:
    """Stands for anything a pickle could smuggle in."""


def test_unsafe_and_missing_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"visual.proj": _Payload()}, path)
    with pytest.raises(ValueError, match="cannot read"):
        build_clip(TINY.clip, clip_weights=path)
    with pytest.raises(ValueError, match="does not exist"):
        build_clip(TINY.clip, clip_weights=tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="tag"):
        build_clip(TINY.clip, clip_weights="tag:openai")


def test_class_name_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="BPE tokens"):
        build_weakclip(TINY, ["background", "a remarkably verbose category name"])


def test_paper_model_parameter_budget() -> None:
    model = build_weakclip(preset("vit-b-16"), VOC_NAMES)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert abs(total - 171.5e6) / 171.5e6 < 0.01, total
    assert abs(trainable - 21.2e6) / 21.2e6 < 0.02, trainable
