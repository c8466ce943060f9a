"""Text-guided decoder: an FPN over the adapter pyramid, each level joined with the score map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_LEVELS = 4


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias: BN follows) -> BatchNorm -> ReLU; the paper's "C.B.R." block."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class TextGuidedDecoder(nn.Module):
    """Segments from the adapter pyramid guided by the text-to-pixel score map.

    The score map is resized bilinearly to every level and concatenated (C + K channels). An FPN
    neck (1x1 laterals to `width`, top-down nearest-upsample-and-add, 3x3 output convs) is
    followed by a semantic-FPN head: level i runs `head_blocks[i]` C.B.R. blocks, each block of a
    coarser level followed by a bilinear upsample to the next finer level's size; the levels are
    summed at the finest level, then Dropout2d and a 1x1 classifier.

    Every resize targets the actual size of the destination level, so odd and non-square
    inputs (where levels are not exact multiples of each other) work. With `upsample_by_two`
    each block of a coarser level is followed by a x2 upsample instead and the level is resized
    to the finest size only at the end (the released head; the same on grids that are multiples
    of 8).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        width: int,
        head_blocks: Sequence[int],
        dropout: float,
        upsample_by_two: bool = False,
        default_init: bool = False,
    ) -> None:
        """
        Args:
            in_channels: channels C of each adapter level (768 for ViT-B/16).
            num_classes: number of classes K, background included (also the score map's K).
            width: FPN and head width (256).
            head_blocks: C.B.R. blocks per level, finest first ((1, 1, 2, 3)).
            dropout: Dropout2d probability before the classifier (0.1).
            upsample_by_two: x2 upsampling steps in the head (`decoder.upsample_by_two`).
            default_init: keep PyTorch's default initialisation (`decoder.default_init`).
        """
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if len(head_blocks) != NUM_LEVELS or any(n < 1 for n in head_blocks):
            raise ValueError(
                f"head_blocks must be {NUM_LEVELS} positive counts, got {tuple(head_blocks)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.upsample_by_two = upsample_by_two

        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(in_channels + num_classes, width, kernel_size=1) for _ in range(NUM_LEVELS)
        )
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, padding=1) for _ in range(NUM_LEVELS)
        )
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(ConvBNReLU(in_channels=width, out_channels=width) for _ in range(n))
            for n in head_blocks
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)
        self._init_weights(default_init)

    def _init_weights(self, default_init: bool) -> None:
        # The usual semantic-FPN initialisation: Xavier for the neck, He for the ReLU blocks,
        # and a near-zero classifier so the initial logits are close to uniform. The released
        # code never calls it: its neck keeps mmcv ConvModule's He init and its classifier
        # PyTorch's default (`default_init`).
        for conv in [*self.lateral_convs, *self.fpn_convs]:
            if default_init:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        for module in self.scale_heads.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if not default_init:
            nn.init.normal_(self.classifier.weight, std=0.01)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[Tensor], score_map: Tensor) -> Tensor:
        """
        Args:
            features: four adapter levels, finest first, each B x C x h_i x w_i.
            score_map: B x K x h x w text-to-pixel scores (any resolution).

        Returns:
            B x K x h_1 x w_1 logits at the finest level's size (1/4 of the input).
        """
        if len(features) != NUM_LEVELS:
            raise ValueError(f"expected {NUM_LEVELS} feature levels, got {len(features)}")
        batch = score_map.shape[0]
        if score_map.dim() != 4 or score_map.shape[1] != self.num_classes:
            raise ValueError(
                f"score_map must be B x {self.num_classes} x h x w, got {tuple(score_map.shape)}"
            )
        for index, feature in enumerate(features):
            if feature.dim() != 4 or feature.shape[:2] != (batch, self.in_channels):
                raise ValueError(
                    f"level {index} must be {batch} x {self.in_channels} x h x w, "
                    f"got {tuple(feature.shape)}"
                )

        guided = [_concat_score_map(feature, score_map) for feature in features]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, guided, strict=True)]
        for index in range(NUM_LEVELS - 1, 0, -1):
            finer = laterals[index - 1]
            laterals[index - 1] = finer + F.interpolate(
                laterals[index], size=finer.shape[-2:], mode="nearest"
            )
        pyramid = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]

        sizes = [level.shape[-2:] for level in pyramid]
        fused: Tensor | None = None
        for index, (blocks, x) in enumerate(zip(self.scale_heads, pyramid, strict=True)):
            for step, block in enumerate(blocks.children()):
                x = block(x)
                target = index - 1 - step
                if target >= 0 and self.upsample_by_two:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
                elif target >= 0:
                    x = F.interpolate(x, size=sizes[target], mode="bilinear", align_corners=False)
            if x.shape[-2:] != sizes[0]:
                x = F.interpolate(x, size=sizes[0], mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        assert fused is not None
        return self.classifier(self.dropout(fused))  # B x K x h_1 x w_1


def _concat_score_map(feature: Tensor, score_map: Tensor) -> Tensor:
    """Concatenates `score_map` resized to `feature`'s size: B x (C + K) x h x w."""
    # align_corners=True follows the released code's score-map resize.
    resized = F.interpolate(score_map, size=feature.shape[-2:], mode="bilinear", align_corners=True)
    return torch.cat([feature, resized], dim=1)


__all__ = ["ConvBNReLU", "TextGuidedDecoder"]
