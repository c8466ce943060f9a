"""The retraining network: shapes, gradients, backbone weights, and the `model.pt` round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.retrain.model import (
    build_model,
    export_model,
    load_backbone_weights,
    load_retrained_model,
    logits,
    predict_labels,
)


def test_small_variant_shapes_size_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("small", 7)
    params = sum(p.numel() for p in model.parameters())
    assert 300_000 < params < 1_000_000, params
    images = torch.randn(2, 3, 96, 128)
    out = logits(model, images)
    assert out.shape == (2, 7, 96, 128)
    out.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    model.eval()
    labels = predict_labels(model, np.zeros((50, 70, 3), np.uint8))
    assert labels.shape == (50, 70) and labels.dtype == np.uint8 and labels.max() < 7


@pytest.mark.parametrize(
    ("architecture", "low", "high"),
    [("resnet50", 39e6, 40e6), ("mobilenet_v3_large", 10e6, 12e6)],
)
def test_torchvision_variants_build_offline(architecture: str, low: float, high: float) -> None:
    model = build_model(architecture, 21).eval()
    params = sum(p.numel() for p in model.parameters())
    assert low < params < high, params
    with torch.no_grad():
        assert logits(model, torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)


def test_build_model_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="architecture"):
        build_model("resnet18", 21)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small", 1)


def test_backbone_weights_load_strictly(tmp_path) -> None:
    torch.manual_seed(1)
    donor = build_model("small", 7)
    backbone = donor.backbone.state_dict()
    target = build_model("small", 5)

    # An ImageNet-style file: backbone keys plus a classifier head, which is dropped.
    path = tmp_path / "imagenet.pth"
    torch.save({**backbone, "fc.weight": torch.zeros(10, 128)}, path)
    load_backbone_weights(target, str(path), architecture="small")
    for key, value in target.backbone.state_dict().items():
        torch.testing.assert_close(value, backbone[key])

    # A segmentation state dict (keys under backbone.) in safetensors.
    seg = tmp_path / "seg.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(seg))
    load_backbone_weights(build_model("small", 7), str(seg), architecture="small")

    wrong = dict(backbone)
    del wrong["layer1.conv1.weight"]
    wrong["layer9.weight"] = torch.zeros(1)
    wrong["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    bad = tmp_path / "bad.pt"
    torch.save(wrong, bad)
    with pytest.raises(ValueError, match="layer1.conv1.weight") as info:
        load_backbone_weights(target, str(bad), architecture="small")
    assert "layer9.weight" in str(info.value) and "conv1.weight (3, 3, 3, 3)" in str(info.value)

    pickled = tmp_path / "pickled.pt"
    torch.save({"model": object()}, pickled)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|state dict"):
        load_backbone_weights(target, str(pickled), architecture="small")


def test_export_round_trip_loads_with_weights_only(tmp_path) -> None:
    torch.manual_seed(2)
    model = build_model("small", 7).eval()
    path = tmp_path / "model.pt"
    names = [f"c{i}" for i in range(7)]
    export_model(
        str(path), model=model, architecture="small", class_names=names, config={}, iteration=3
    )
    payload = torch.load(path, weights_only=True)
    assert payload["iteration"] == 3 and payload["class_names"] == names
    loaded, loaded_names = load_retrained_model(str(path))
    assert loaded_names == names and not loaded.training
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, images), logits(model, images))
