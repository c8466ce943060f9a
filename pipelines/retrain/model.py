"""The downstream segmentation network (docs/METHOD.md): torchvision DeepLabV3, and its `model.pt`.

`ARCHITECTURES`: torchvision's `deeplabv3_{resnet50,resnet101,mobilenet_v3_large}` (nothing
downloaded, no auxiliary head), and `small`, the same composition on a narrow one-block-per-stage
ResNet with a 64-channel ASPP (about 0.6M parameters) for tests and the 2-core demo. Backbone
weights: `load_backbone_weights`. `model.pt` is one `torch.save` of plain containers: format
tag, architecture, class names, the stage config, the state dict and the iteration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import segmentation
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3

from pipelines.training.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipelines.training.checkpoint import load_weights_only, read_export_payload, write_export

ARCHITECTURES = ("small", "resnet50", "resnet101", "mobilenet_v3_large")
EXPORT_FORMAT = "weakclip-retrain-v1"
SMALL_WIDTHS = (16, 32, 64, 128)  # channels of the small backbone's four stages
SMALL_ASPP_CHANNELS = 64
SMALL_ATROUS_RATES = (6, 12, 18)  # at output stride 16, as DeepLabV3 trains
# Classifier heads of an ImageNet or segmentation state dict: not backbone weights.
_HEAD_PREFIXES = ("fc.", "classifier.", "aux_classifier.")


class SmallResNet(nn.Module):
    """A four-stage ResNet of one `BasicBlock` each, output stride 16 (no dilation needed).

    Stage strides 1, 2, 2, 1 after the /4 stem (conv 3x3 s2 + max-pool), so `layer4` is at
    1/16 of the input: B x 3 x H x W in, B x widths[-1] x H/16 x W/16 from `layer4`.
    """

    def __init__(self, *, widths: Sequence[int] = SMALL_WIDTHS) -> None:
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive ints, got {tuple(widths)}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = widths[0]
        for index, (width, stride) in enumerate(zip(widths, (1, 2, 2, 1), strict=True)):
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
            setattr(self, f"layer{index + 1}", BasicBlock(inplanes, width, stride, downsample))
            inplanes = width
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W → B x C x H/16 x W/16."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _small_deeplabv3(num_classes: int) -> DeepLabV3:
    backbone = IntermediateLayerGetter(SmallResNet(), return_layers={"layer4": "out"})
    width = SMALL_ASPP_CHANNELS
    classifier = nn.Sequential(
        ASPP(SMALL_WIDTHS[-1], SMALL_ATROUS_RATES, out_channels=width),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, num_classes, 1),
    )
    return DeepLabV3(backbone, classifier, None)


def build_model(architecture: str, num_classes: int) -> DeepLabV3:
    """A randomly initialised DeepLabV3: B x 3 x H x W → `{"out": B x K x H x W}` logits."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if architecture == "small":
        return _small_deeplabv3(num_classes)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    builder = getattr(segmentation, f"deeplabv3_{architecture}")
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


def read_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a `torch.save` file (read with weights_only=True).

    A `torch.save` file may wrap the state dict as `{"state_dict": ...}` or `{"model": ...}`.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    data = load_weights_only(path, what="backbone weights")
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise ValueError(f"{path!r} holds no state dict of named tensors")
    return dict(data)


def backbone_state(
    weights: Mapping[str, torch.Tensor], architecture: str
) -> dict[str, torch.Tensor]:
    """`weights` renamed to the backbone's keys: they may hold the backbone's keys, a segmentation
    model's under `backbone.`, or an ImageNet classifier's (head dropped, MobileNet's `features.`
    stripped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = key.removeprefix("module.")
        if name.startswith("backbone."):
            name = name.removeprefix("backbone.")
        elif name.startswith(_HEAD_PREFIXES):
            continue
        elif architecture.startswith("mobilenet"):
            name = name.removeprefix("features.")
        out[name] = value
    return out


def load_backbone_weights(model: DeepLabV3, path: str, *, architecture: str) -> None:
    """Loads a backbone weights file (`read_weights_file`) into `model.backbone`, refusing any
    mismatch: every backbone key must fit.

    Raises:
        ValueError: keys missing or unexpected, or shapes that differ (the message names them).
    """
    target = model.backbone.state_dict()
    given = backbone_state(read_weights_file(path), architecture)
    missing = sorted(set(target) - set(given))
    unexpected = sorted(set(given) - set(target))
    shapes = sorted(
        f"{k} {tuple(given[k].shape)} != {tuple(target[k].shape)}"
        for k in set(target) & set(given)
        if given[k].shape != target[k].shape
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"backbone weights {path!r} do not fit the {architecture} backbone: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}, {len(shapes)} with other shapes {shapes[:3]}"
        )
    model.backbone.load_state_dict(given, strict=True)


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W normalised images → B x K x H x W logits (the `out` head)."""
    return model(images)["out"]


@torch.inference_mode()
def predict_labels(
    model: nn.Module,
    image: np.ndarray,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """H x W uint8 class ids (argmax of the logits) of an H x W x 3 uint8 RGB image at its size,
    by a DeepLabV3 in eval mode on `device` trained with the `mean`/`std` normalisation."""
    tensor = torch.from_numpy(normalize(image, mean=mean, std=std))[None].to(device)
    return logits(model, tensor)[0].argmax(0).to(torch.uint8).cpu().numpy()


def export_model(
    path: str,
    *,
    model: nn.Module,
    architecture: str,
    class_names: Sequence[str],
    config: Mapping[str, Any],
    iteration: int,
) -> None:
    """Writes `model.pt` (see the module docstring)."""
    write_export(
        path,
        fmt=EXPORT_FORMAT,
        model=model,
        config=config,
        architecture=architecture,
        class_names=list(class_names),
        iteration=int(iteration),
    )


def read_export(path: str) -> dict[str, Any]:
    """The `model.pt` payload, read with `weights_only=True` and checked."""
    payload = read_export_payload(path, fmt=EXPORT_FORMAT, kind="retrained-model")
    if payload.get("architecture") not in ARCHITECTURES:
        raise ValueError(f"{path!r}: unknown architecture {payload.get('architecture')!r}")
    return payload


def load_retrained_model(path: str) -> tuple[DeepLabV3, list[str]]:
    """(network of a `model.pt`, every weight loaded strictly, in eval mode; class names)."""
    payload = read_export(path)
    model = build_model(payload["architecture"], len(payload["class_names"]))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), list(payload["class_names"])
