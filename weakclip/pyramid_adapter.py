"""Pyramid adapter: turns four single-scale ViT taps into a 1/4 .. 1/32 feature pyramid."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

NUM_LEVELS = 4


class PyramidAdapter(nn.Module):
    """Builds a four-level feature pyramid from four ViT taps at stride p (16 for ViT-B/16).

    Level 1 (stride p/4) comes from tap 1 upsampled twice, level 2 (p/2) from tap 2 upsampled
    once, level 3 (p) is tap 3 normalised, level 4 (2p) is tap 4 max-pooled. Every level keeps
    the tap's channel count.

    The paper trains the adapter; the released code left it frozen by accident (its issue #2).
    ``trainable=False`` reproduces that: parameters get ``requires_grad=False``. As in the
    released code, the BatchNorm running statistics still follow ``train()``/``eval()``.
    """

    def __init__(self, *, channels: int, trainable: bool = True) -> None:
        """
        Args:
            channels: channel count C of every tap and every output level.
            trainable: whether the adapter's parameters receive gradients.
        """
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        self.trainable = trainable
        # SyncBatchNorm in the released code; data-parallel training converts it with
        # nn.SyncBatchNorm.convert_sync_batchnorm, so the library keeps the plain layer.
        self.level1 = nn.Sequential(
            nn.GroupNorm(1, channels),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        )
        self.level2 = nn.Sequential(
            nn.GroupNorm(1, channels),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        )
        self.level3 = nn.GroupNorm(1, channels)
        self.level4 = nn.Sequential(
            nn.GroupNorm(1, channels),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        if not trainable:
            self.requires_grad_(False)

    def forward(self, taps: Sequence[Tensor]) -> list[Tensor]:
        """
        Args:
            taps: four tensors, each B x C x h x w (h, w >= 2 so the 1/32 level is not empty).

        Returns:
            Four tensors: B x C x 4h x 4w, B x C x 2h x 2w, B x C x h x w,
            B x C x floor(h/2) x floor(w/2).
        """
        if len(taps) != NUM_LEVELS:
            raise ValueError(f"expected {NUM_LEVELS} taps, got {len(taps)}")
        for index, tap in enumerate(taps):
            if tap.dim() != 4 or tap.shape[1] != self.channels:
                raise ValueError(
                    f"tap {index} must be B x {self.channels} x h x w, got {tuple(tap.shape)}"
                )
            if min(tap.shape[-2:]) < 2:
                raise ValueError(f"tap {index} is too small to pool: {tuple(tap.shape)}")
        levels = (self.level1, self.level2, self.level3, self.level4)
        return [level(tap) for level, tap in zip(levels, taps, strict=True)]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, trainable={self.trainable}"


__all__ = ["NUM_LEVELS", "PyramidAdapter"]
