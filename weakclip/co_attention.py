"""Co-attention matching: text and image embeddings update each other before matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention with bias-free query/key/value projections (as DenseCLIP's).

    Attention weights are not dropped; dropout applies to the output projection.
    """

    def __init__(self, *, width: int, heads: int, dropout: float) -> None:
        """
        Args:
            width: token width W, divisible by `heads`.
            heads: number of attention heads.
            dropout: dropout probability on the output.
        """
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.query_proj = nn.Linear(width, width, bias=False)
        self.key_proj = nn.Linear(width, width, bias=False)
        self.value_proj = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        # B x N x W -> B x heads x N x W/heads
        return x.reshape(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """
        Args:
            query: B x N x W tokens that attend.
            memory: B x M x W tokens attended to.

        Returns:
            B x N x W attention output.
        """
        batch, tokens, width = query.shape
        q = self._split_heads(self.query_proj(query))
        k = self._split_heads(self.key_proj(memory))
        v = self._split_heads(self.value_proj(memory))
        out = F.scaled_dot_product_attention(q, k, v)  # B x heads x N x W/heads
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.dropout(self.out_proj(out))


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention to a memory, MLP.

    The memory is used as given (the caller layer-normalises it once, in the input projection).
    """

    def __init__(self, *, width: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        """
        Args:
            width: token width W.
            heads: attention heads.
            mlp_ratio: hidden width of the MLP as a multiple of W.
            dropout: dropout on attention outputs and in the MLP.
        """
        super().__init__()
        self.self_attn = Attention(width=width, heads=heads, dropout=dropout)
        self.cross_attn = Attention(width=width, heads=heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, width * mlp_ratio),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width * mlp_ratio, width),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """
        Args:
            x: B x N x W query tokens.
            memory: B x M x W tokens to attend to.

        Returns:
            B x N x W updated tokens.
        """
        normed = self.norm1(x)
        x = x + self.self_attn(normed, normed)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


class CoAttentionMatching(nn.Module):
    """Lets text embeddings attend to the image and image embeddings attend to the text.

    Visual tokens are ``[global; dense]``. Both modalities are projected once to `width`
    (LN -> Linear -> LN for visual, LN -> Linear for text) and feed two stacks of
    `layers` decoder layers: the text stack (text queries, visual memory) and the visual
    stack (visual queries, text memory). Each stack's output is projected back to D
    (LN -> Linear) and added with a learnable per-channel temperature:
    ``visual += beta * delta_visual``, ``text += gamma * delta_text``.

    ``chain_layers=False`` reproduces the released code's loop, which assigned
    ``delta = layer(projected_input, memory)`` for every layer without feeding the result to the
    next: the delta is the *last* layer applied to the projected input, and layers
    ``1 .. layers-1`` are dead (their outputs are discarded, their parameters never receive a
    gradient). Only the last layer is evaluated then, which gives the same output. For
    ``layers == 1`` both settings are identical.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        width: int,
        heads: int,
        layers: int,
        dropout: float,
        mlp_ratio: int,
        temperature_init: float,
        chain_layers: bool = True,
    ) -> None:
        """
        Args:
            embed_dim: joint CLIP embedding width D (512 for ViT-B/16).
            width: internal token width W (256).
            heads: attention heads per layer (4).
            layers: decoder layers per stack (3).
            dropout: dropout probability inside the layers (0.1).
            mlp_ratio: MLP hidden width as a multiple of W (4).
            temperature_init: initial value of every entry of beta and gamma (0.1).
            chain_layers: feed each layer the previous layer's output (the paper); False
                reproduces the released code's unchained loop.
        """
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("width", width),
            ("heads", heads),
            ("layers", layers),
            ("mlp_ratio", mlp_ratio),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.chain_layers = chain_layers

        self.visual_proj = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width), nn.LayerNorm(width)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.text_layers = nn.ModuleList(
            DecoderLayer(width=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
            for _ in range(layers)
        )
        self.visual_layers = nn.ModuleList(
            DecoderLayer(width=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
            for _ in range(layers)
        )
        self.text_out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.visual_out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.apply(_init_weights)
        # gamma and beta in the paper
        self.text_temperature = nn.Parameter(torch.full((embed_dim,), float(temperature_init)))
        self.visual_temperature = nn.Parameter(torch.full((embed_dim,), float(temperature_init)))

    def _run_stack(self, stack: nn.ModuleList, x: Tensor, memory: Tensor) -> Tensor:
        if not self.chain_layers:
            return stack[-1](x, memory)
        for layer in stack:
            x = layer(x, memory)
        return x

    def forward(
        self, global_embedding: Tensor, dense_embedding: Tensor, text: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            global_embedding: B x D image embedding (CLS token).
            dense_embedding: B x D x h x w per-patch embeddings.
            text: K x D (shared by the batch) or B x K x D class embeddings.

        Returns:
            Updated (global B x D, dense B x D x h x w, text B x K x D).
        """
        batch, dim, height, width = dense_embedding.shape
        if dim != self.embed_dim or global_embedding.shape != (batch, dim):
            raise ValueError(
                f"expected global B x {self.embed_dim} and dense B x {self.embed_dim} x h x w, "
                f"got {tuple(global_embedding.shape)} and {tuple(dense_embedding.shape)}"
            )
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(batch, -1, -1)
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != dim:
            raise ValueError(
                f"text must be K x {dim} or {batch} x K x {dim}, got {tuple(text.shape)}"
            )

        # B x (1 + h*w) x D
        visual = torch.cat(
            [global_embedding.unsqueeze(1), dense_embedding.flatten(2).transpose(1, 2)], dim=1
        )
        visual_tokens = self.visual_proj(visual)  # B x (1 + h*w) x W
        text_tokens = self.text_proj(text)  # B x K x W

        # Both stacks read the projected inputs of the other modality, so they are independent.
        text_delta = self.text_out_proj(
            self._run_stack(self.text_layers, text_tokens, visual_tokens)
        )
        visual_delta = self.visual_out_proj(
            self._run_stack(self.visual_layers, visual_tokens, text_tokens)
        )
        text = text + self.text_temperature * text_delta
        visual = visual + self.visual_temperature * visual_delta

        global_out = visual[:, 0]
        dense_out = visual[:, 1:].transpose(1, 2).reshape(batch, dim, height, width)
        return global_out, dense_out, text


def _init_weights(module: nn.Module) -> None:
    # Small truncated-normal linear weights (as DenseCLIP's context decoder) keep the initial
    # deltas small next to the CLIP embeddings they update.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = ["Attention", "CoAttentionMatching", "DecoderLayer"]
