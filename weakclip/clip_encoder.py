"""Frozen CLIP image encoder: multi-level ViT taps plus global and dense embeddings.

The encoder of the method (docs/METHOD.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

# Distinct grids seen per forward are few (one per window/scale shape); bound the cache anyway.
_MAX_CACHED_GRIDS = 16


class ImageFeatures(NamedTuple):
    """What the image encoder hands to the rest of WeakCLIP.

    Attributes:
        taps: one tensor per tap layer, B x C x h x w: the patch tokens after that block, before
            `ln_post`, class token dropped.
        global_embedding: B x D, the class token after `ln_post` and `proj`.
        dense_embedding: B x D x h x w, the patch tokens after `ln_post` and `proj`.
    """

    taps: tuple[Tensor, ...]
    global_embedding: Tensor
    dense_embedding: Tensor


class CLIPImageEncoder(nn.Module):
    """Wraps open_clip's `VisionTransformer`, frozen and always in eval mode.

    The position embedding is resized bilinearly from the checkpoint's grid to the grid of
    `input_size` once, here, and again at each forward whose grid differs (from the resized
    grid, as the released code does; cached per grid). Images whose sides are not multiples of
    the patch size are covered by floor(H/p) x floor(W/p) patches, like the patch convolution.
    """

    def __init__(
        self,
        *,
        visual: VisionTransformer,
        input_size: int | tuple[int, int],
        tap_layers: Sequence[int],
        class_embedding_twice: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        """
        Args:
            visual: an open_clip ViT with a class token, no attentional pooling and a
                projection; taken over (its position embedding is replaced) and frozen.
            input_size: the training input side (or height, width); sets the stored grid.
            tap_layers: 1-based numbers of the blocks whose outputs become `taps`.
            class_embedding_twice: add the class embedding to the class token a second time,
                after the position embedding (the released ViT; `clip.class_embedding_twice`).
            drop_path_rate: stochastic depth while the model trains, linear over the blocks
                from 0 to this rate (`clip.drop_path_rate`); never in eval mode.
        """
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"visual must be an open_clip VisionTransformer, got {type(visual)}")
        if visual.attn_pool is not None or visual.proj is None:
            raise ValueError("visual must have no attentional pooler and a projection")
        patch_h, patch_w = visual.patch_size
        if patch_h != patch_w:
            raise ValueError(f"only square patches are supported, got {visual.patch_size}")
        num_blocks = len(visual.transformer.resblocks)
        if not tap_layers or not all(1 <= t <= num_blocks for t in tap_layers):
            raise ValueError(f"tap_layers must lie in 1..{num_blocks}, got {tuple(tap_layers)}")
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if height < patch_h or width < patch_w:
            raise ValueError(f"input_size {input_size} is smaller than the patch size {patch_h}")

        self.visual = visual
        self.patch_size: int = patch_h
        self.width: int = visual.conv1.out_channels  # C
        self.embed_dim: int = visual.proj.shape[1]  # D
        self.tap_layers: tuple[int, ...] = tuple(tap_layers)
        self.class_embedding_twice = class_embedding_twice
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        # Per block, as the released ViT: linspace(0, rate, blocks).
        self.drop_path_rates = torch.linspace(0, drop_path_rate, num_blocks).tolist()
        self.stochastic_depth = False  # on while the model trains (`train`)

        grid = (height // patch_h, width // patch_w)
        with torch.no_grad():
            resized = _resize_positional_embedding(
                visual.positional_embedding, visual.grid_size, grid
            )
        visual.positional_embedding = nn.Parameter(resized.contiguous())
        visual.grid_size = grid
        visual.image_size = (grid[0] * patch_h, grid[1] * patch_w)
        self.requires_grad_(False)
        self._grid_cache: dict[tuple[object, ...], Tensor] = {}
        super().train(False)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The grid of the stored position embedding (input_size / patch size)."""
        return tuple(self.visual.grid_size)  # type: ignore[return-value]

    def train(self, mode: bool = True) -> CLIPImageEncoder:
        """Stays in eval mode whatever `mode` is (the encoder is frozen); `mode` only turns the
        stochastic depth of `drop_path_rate` on or off."""
        self.stochastic_depth = mode and max(self.drop_path_rates) > 0
        return super().train(False)

    def forward(self, images: Tensor) -> ImageFeatures:
        """
        Args:
            images: B x 3 x H x W normalised images, H, W >= the patch size p.

        Returns:
            `ImageFeatures` with h = floor(H / p), w = floor(W / p); no autograd graph while
            the encoder is frozen (`clip.train_image_encoder` or a probe unfreezes it).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
        if min(images.shape[-2:]) < self.patch_size:
            raise ValueError(
                f"images must be at least {self.patch_size} pixels on each side, "
                f"got {tuple(images.shape[-2:])}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._trainable()):
            return self._forward(images)

    def _trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def _forward(self, images: Tensor) -> ImageFeatures:
        visual = self.visual
        batch = images.shape[0]
        x = visual.conv1(images)  # B x C x h x w
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # B x hw x C
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1)  # B x (1 + hw) x C
        x = x + self.positional_embedding_for((h, w)).to(x.dtype)
        if self.class_embedding_twice:  # the released ViT: 2 e_cls + pos_0 (D1)
            x = torch.cat([x[:, :1] + cls, x[:, 1:]], dim=1)
        x = visual.ln_pre(x)

        batch_first = visual.transformer.batch_first
        taps: list[Tensor] = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            rate = self.drop_path_rates[index - 1] if self.stochastic_depth else 0.0
            if rate > 0:
                x = _block_with_drop_path(block, x, rate)
            elif batch_first:
                x = block(x)
            else:
                x = block(x.transpose(0, 1)).transpose(0, 1)
            if index in self.tap_layers:
                patches = x[:, 1:].transpose(1, 2)  # B x C x hw
                taps.append(patches.reshape(batch, -1, h, w).contiguous())

        x = visual.ln_post(x) @ visual.proj  # B x (1 + hw) x D
        dense = x[:, 1:].transpose(1, 2).reshape(batch, -1, h, w).contiguous()
        return ImageFeatures(taps=tuple(taps), global_embedding=x[:, 0], dense_embedding=dense)

    def positional_embedding_for(self, grid: tuple[int, int]) -> Tensor:
        """The position embedding for a grid: (1 + h*w) x C, class position first."""
        stored = self.visual.positional_embedding
        if tuple(grid) == self.grid_size:
            return stored
        if stored.requires_grad and torch.is_grad_enabled():  # being trained: keep the graph
            return _resize_positional_embedding(stored, self.grid_size, tuple(grid))
        # The version counter changes when the weights are loaded or edited in place.
        key = (tuple(grid), stored.device, stored.dtype, stored._version)
        cached = self._grid_cache.get(key)
        if cached is None:
            if len(self._grid_cache) >= _MAX_CACHED_GRIDS:
                self._grid_cache.clear()
            with torch.no_grad():
                cached = _resize_positional_embedding(stored, self.grid_size, tuple(grid))
            self._grid_cache[key] = cached
        return cached

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Moving or casting the module invalidates cached embeddings.
        self._grid_cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, tap_layers={self.tap_layers}"


def _block_with_drop_path(block: nn.Module, x: Tensor, rate: float) -> Tensor:
    """An open_clip residual block on B x N x C tokens whose two residual branches are each
    dropped for a whole sample with probability `rate` (kept ones scaled by 1 / (1 - rate))."""

    def drop(branch: Tensor) -> Tensor:
        keep = branch.new_empty(branch.shape[0], 1, 1).bernoulli_(1.0 - rate)
        return branch * keep / (1.0 - rate)

    batch_first = getattr(block.attn, "batch_first", False)

    def attend(tokens: Tensor) -> Tensor:
        if batch_first:
            return block.attention(q_x=tokens)
        return block.attention(q_x=tokens.transpose(0, 1)).transpose(0, 1)

    x = x + drop(block.ls_1(attend(block.ln_1(x))))
    return x + drop(block.ls_2(block.mlp(block.ln_2(x))))


def _resize_positional_embedding(
    embedding: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
) -> Tensor:
    """Bilinearly resizes the patch part of a (1 + h*w) x C embedding; the class row is kept."""
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    if embedding.shape[0] != 1 + old_h * old_w:
        raise ValueError(
            f"position embedding has {embedding.shape[0]} rows, expected 1 + {old_h}*{old_w}"
        )
    if (old_h, old_w) == (new_h, new_w):
        return embedding.detach().clone()
    cls, patches = embedding[:1], embedding[1:]
    patches = patches.reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)  # 1 x C x h x w
    patches = F.interpolate(
        patches.float(), size=(new_h, new_w), mode="bilinear", align_corners=False
    ).to(embedding.dtype)
    patches = patches.permute(0, 2, 3, 1).reshape(new_h * new_w, -1)
    return torch.cat([cls, patches], dim=0)  # in the graph only when `embedding` trains
