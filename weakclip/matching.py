"""Text-to-pixel matching: cosine similarity between each class embedding and each pixel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def text_to_pixel_scores(dense: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of every class embedding with every dense visual embedding.

    Args:
        dense: B x D x h x w dense visual embeddings.
        text: B x K x D class embeddings.

    Returns:
        B x K x h x w score map with values in [-1, 1]. A zero vector scores 0 against
        everything (F.normalize's epsilon), rather than producing NaN.
    """
    if dense.dim() != 4 or text.dim() != 3:
        raise ValueError(
            f"expected dense B x D x h x w and text B x K x D, "
            f"got {tuple(dense.shape)} and {tuple(text.shape)}"
        )
    if dense.shape[0] != text.shape[0] or dense.shape[1] != text.shape[2]:
        raise ValueError(
            f"batch or embedding width differ: dense {tuple(dense.shape)}, text {tuple(text.shape)}"
        )
    dense = F.normalize(dense, dim=1)
    text = F.normalize(text, dim=2)
    return torch.einsum("bdhw,bkd->bkhw", dense, text)


__all__ = ["text_to_pixel_scores"]
