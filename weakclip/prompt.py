"""Learnable prompt over CLIP's frozen text encoder: one text feature per class (docs/METHOD.md)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor, nn


@functools.cache
def _tokenizer() -> SimpleTokenizer:
    # Reads the BPE vocabulary that ships inside open_clip: no network.
    return SimpleTokenizer()


def class_name_tokens(name: str) -> list[int]:
    """The BPE token ids of a class name, without start and end tokens."""
    return list(_tokenizer().encode(name))


UNUSED_PREFIX = "unused_"


def prompt_name(class_name: str) -> str:
    """The words a class is prompted with: its name, except for placeholder ids.

    A class space may hold ids no image ever has (COCO's 91-id space names its 10 unused ids
    `unused_<n>`); they keep their place among the logits, and are prompted by the one word
    "unused", since their number means nothing (and "unused_12" is 4 BPE tokens, more than fit).
    """
    if class_name.startswith(UNUSED_PREFIX) and class_name[len(UNUSED_PREFIX) :].isdigit():
        return "unused"
    return class_name


class PromptTextEncoder(nn.Module):
    """CLIP's text transformer (frozen) with learnable context vectors shared by all classes.

    Per class the token sequence is `[SOT] + context + name tokens + [EOT]`, padded to
    `context_length`; the text feature is `ln_final(x[EOT]) @ text_projection`. The weights are
    frozen but autograd stays on, so gradients reach the context vectors. With no context
    vectors and `context_length` equal to CLIP's, this computes `CLIP.encode_text`.
    """

    def __init__(
        self,
        *,
        clip: CLIP | TextTransformer,
        class_names: Sequence[str],
        num_context: int,
        context_length: int,
    ) -> None:
        """
        Args:
            clip: an open_clip `CLIP` (or its `TextTransformer`) with a causal, EOT-pooled text
                tower; its text modules are taken over and frozen.
            class_names: one raw name per class, index = class id ("background" first for
                WSSS); no template.
            num_context: number of learnable context vectors.
            context_length: total tokens per prompt, at most CLIP's context length.

        Raises:
            ValueError: a class name does not fit in `context_length - 2 - num_context` tokens,
                or the arguments are inconsistent.
        """
        super().__init__()
        if getattr(clip, "cls_emb", None) is not None:
            raise ValueError("text towers with an appended class token (CoCa) are not supported")
        if getattr(clip, "attn_mask", None) is None:
            raise ValueError("the text tower must use a causal attention mask")
        pool_type = getattr(clip, "text_pool_type", getattr(clip, "pool_type", "argmax"))
        if pool_type != "argmax":
            raise ValueError(f"the text tower must pool the EOT token, not {pool_type!r}")
        if num_context < 0:
            raise ValueError(f"num_context must be >= 0, got {num_context}")
        clip_length = clip.positional_embedding.shape[0]
        if not num_context + 3 <= context_length <= clip_length:
            raise ValueError(
                f"context_length must be in [{num_context + 3}, {clip_length}], "
                f"got {context_length}"
            )
        if not class_names:
            raise ValueError("class_names must not be empty")

        self.num_context = num_context
        self.context_length = context_length
        self._class_names: tuple[str, ...] = tuple(class_names)

        self.token_embedding: nn.Embedding = clip.token_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.positional_embedding = nn.Parameter(
            clip.positional_embedding.detach()[:context_length].clone()
        )
        self.requires_grad_(False)

        width = self.token_embedding.embedding_dim
        # Truncated normal, std 1, cut at +-2 std (DenseCLIP's context initialisation).
        self.context = nn.Parameter(torch.empty(num_context, width))
        nn.init.trunc_normal_(self.context, std=1.0)

        name_tokens, eot_index = self._tokenize(self._class_names)
        self.register_buffer("name_tokens", name_tokens, persistent=False)  # K x (L - n)
        self.register_buffer("eot_index", eot_index, persistent=False)  # K
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)  # L x L

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names, index = class id."""
        return self._class_names

    @property
    def num_classes(self) -> int:
        """K."""
        return len(self._class_names)

    @property
    def width(self) -> int:
        """Width of the context vectors (the text transformer's width)."""
        return self.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        """D, the width of the text features."""
        projection = self.text_projection
        if projection is None:
            return self.width
        if isinstance(projection, nn.Linear):
            return projection.out_features
        return projection.shape[1]

    def _tokenize(self, class_names: Sequence[str]) -> tuple[Tensor, Tensor]:
        tokenizer = _tokenizer()
        room = self.context_length - 2 - self.num_context
        rows = torch.zeros(
            len(class_names), self.context_length - self.num_context, dtype=torch.long
        )
        eot_index = torch.empty(len(class_names), dtype=torch.long)
        for k, name in enumerate(class_names):
            ids = class_name_tokens(prompt_name(name))
            if not ids:
                raise ValueError(f"class {k} has an empty name {name!r}")
            if len(ids) > room:
                raise ValueError(
                    f"class name {name!r} is {len(ids)} BPE tokens; with {self.num_context} "
                    f"context vectors and context length {self.context_length} at most {room} "
                    "fit (prompts are never truncated)"
                )
            sequence = [tokenizer.sot_token_id, *ids, tokenizer.eot_token_id]
            rows[k, : len(sequence)] = torch.tensor(sequence)
            eot_index[k] = len(sequence) - 1 + self.num_context
        return rows, eot_index

    def train(self, mode: bool = True) -> PromptTextEncoder:
        """Sets the mode; the frozen CLIP modules stay in eval mode."""
        super().train(mode)
        for module in (self.token_embedding, self.transformer, self.ln_final):
            module.train(False)
        return self

    def forward(self) -> Tensor:
        """
        Returns:
            K x D text features, one per class, not normalised; differentiable w.r.t. the
            context vectors.
        """
        tokens = self.token_embedding(self.name_tokens)  # K x (L - n) x W
        num_classes = tokens.shape[0]
        context = self.context.to(tokens.dtype).expand(num_classes, -1, -1)  # K x n x W
        x = torch.cat([tokens[:, :1], context, tokens[:, 1:]], dim=1)  # K x L x W
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)  # takes and returns K x L x W
        x = x[torch.arange(num_classes, device=x.device), self.eot_index]  # K x W
        x = self.ln_final(x)
        projection = self.text_projection
        if projection is None:
            return x
        if isinstance(projection, nn.Linear):
            return projection(x)
        return x @ projection

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_context={self.num_context}, "
            f"context_length={self.context_length}"
        )
