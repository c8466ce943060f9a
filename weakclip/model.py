"""WeakCLIP: the frozen CLIP encoders composed with the adapter, co-attention and decoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

from torch import Tensor, nn

from weakclip.matching import text_to_pixel_scores


class WeakCLIPOutput(NamedTuple):
    """What one forward pass returns.

    Attributes:
        logits: B x K x H/4 x W/4 segmentation logits from the decoder.
        score_map: B x K x H/p x W/p text-to-pixel cosine scores (p = patch size); the auxiliary
            loss uses ``score_map / tau``.
        text_embeddings: B x K x D class embeddings after co-attention.
    """

    logits: Tensor
    score_map: Tensor
    text_embeddings: Tensor


class WeakCLIP(nn.Module):
    """The WeakCLIP segmenter. Parts are built elsewhere (`weakclip.build`) and injected.

    Flow: the frozen image encoder gives four taps and the global/dense embeddings; the prompt
    text encoder gives K class embeddings (gradients reach its learnable context); co-attention
    updates image and text embeddings; their cosine similarity is the score map; the decoder
    segments the adapter pyramid guided by the score map.
    """

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        adapter: nn.Module,
        co_attention: nn.Module,
        decoder: nn.Module,
        tau: float,
    ) -> None:
        """
        Args:
            image_encoder: frozen CLIP image encoder; ``image_encoder(images)`` returns an object
                with ``taps`` (4 x B x C x h x w), ``global_embedding`` (B x D) and
                ``dense_embedding`` (B x D x h x w). It runs without gradients itself.
            text_encoder: prompt text encoder; ``text_encoder()`` returns K x D class embeddings
                and ``text_encoder.class_names`` names them.
            adapter: `PyramidAdapter` (taps -> 4 levels at 1/4 .. 1/32).
            co_attention: `CoAttentionMatching`.
            decoder: `TextGuidedDecoder`.
            tau: temperature dividing the score map for the auxiliary loss (0.07).
        """
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.adapter = adapter
        self.co_attention = co_attention
        self.decoder = decoder
        self.tau = tau

    @property
    def class_names(self) -> tuple[str, ...]:
        """The K class names, background first, in logit order."""
        return tuple(cast(Sequence[str], self.text_encoder.class_names))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients: the frozen CLIP weights are excluded."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: Tensor) -> WeakCLIPOutput:
        """
        Args:
            images: B x 3 x H x W normalised images.

        Returns:
            `WeakCLIPOutput` with logits B x K x H/4 x W/4, score map B x K x H/p x W/p and
            updated text embeddings B x K x D.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
        features = self.image_encoder(images)
        text = self.text_encoder()  # K x D
        levels = self.adapter(features.taps)  # 4 x B x C x h_i x w_i
        _, dense, text = self.co_attention(
            features.global_embedding, features.dense_embedding, text
        )
        score_map = text_to_pixel_scores(dense, text)  # B x K x h x w
        logits = self.decoder(levels, score_map)  # B x K x H/4 x W/4
        return WeakCLIPOutput(logits=logits, score_map=score_map, text_embeddings=text)


__all__ = ["WeakCLIP", "WeakCLIPOutput"]
