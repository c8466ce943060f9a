"""The authors' released checkpoint layout (hustvl/WeakCLIP, mmseg 0.19) and ours, both ways.

A released `.pth` is `{"meta": {..., "CLASSES": names}, "state_dict": ..., "optimizer": ...}`;
its `state_dict` holds the whole segmentor under mmseg's names. `from_released` renames every
tensor to this project's `WeakCLIP.state_dict()` names and `to_released` does the reverse, so
a released model loads strictly into a model built with `weakclip.config.released_forward`
(the released forward's behaviour; docs/METHOD.md, "The released code"). Pure: no file I/O
(`weakclip.build.read_released_checkpoint` reads the file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

# The prompt's context: released 1 x n x D, ours n x D.
_RELEASED_CONTEXT, _OUR_CONTEXT = "contexts", "text_encoder.context"
Parts = list[str]  # a tensor name after its prefix, split at the dots


def _same(parts: Parts, backwards: bool) -> Parts | None:
    return parts


def _attention(parts: Parts, backwards: bool) -> Parts | None:
    """Co-attention layers: released `N.self_attn.q_proj.*` (and k, v, `proj`) are our
    `N.self_attn.query_proj.*` (key, value, `out_proj`); the other parts keep their names."""
    words = {"q_proj": "query_proj", "k_proj": "key_proj", "v_proj": "value_proj"}
    words["proj"] = "out_proj"
    if backwards:
        words = {ours: theirs for theirs, ours in words.items()}
    if len(parts) > 2 and parts[1] in ("self_attn", "cross_attn"):
        return [*parts[:2], words[parts[2]], *parts[3:]] if parts[2] in words else None
    return parts


def _neck(parts: Parts, backwards: bool) -> Parts | None:
    """FPN convolutions: released ConvModule `N.conv.*`, our plain conv `N.*`."""
    if backwards:
        return [parts[0], "conv", *parts[1:]]
    return [parts[0], *parts[2:]] if parts[1:2] == ["conv"] else None


def _head(parts: Parts, backwards: bool) -> Parts | None:
    """Scale heads: released `N.M.{conv,bn}.*` (a ConvModule at each even M, an upsample after
    it), our `N.M/2.{0,1}.*` (ConvBNReLU's indices)."""
    if len(parts) < 4 or not parts[1].isdigit():
        return None
    index, kind = int(parts[1]), parts[2]
    if backwards:
        names = {"0": "conv", "1": "bn"}
        return [parts[0], str(2 * index), names[kind], *parts[3:]] if kind in names else None
    names = {"conv": "0", "bn": "1"}
    if kind not in names or index % 2:
        return None
    return [parts[0], str(index // 2), names[kind], *parts[3:]]


# (released prefix, our prefix, how the rest is renamed): the longest matching prefix wins.
_TABLE: list[tuple[str, str, Callable[[Parts, bool], Parts | None]]] = [
    *((f"backbone.fpn{i}", f"adapter.level{i}", _same) for i in range(1, 5)),
    ("backbone", "image_encoder.visual", _same),
    ("text_encoder", "text_encoder", _same),
    (_RELEASED_CONTEXT, _OUR_CONTEXT, _same),
    ("gamma", "co_attention.text_temperature", _same),
    ("beta", "co_attention.visual_temperature", _same),
    ("context_decoder.memory_proj", "co_attention.visual_proj", _same),
    ("context_decoder.text_proj", "co_attention.text_proj", _same),
    ("context_decoder.out_proj", "co_attention.text_out_proj", _same),
    ("context_decoder.anti_out_proj", "co_attention.visual_out_proj", _same),
    ("context_decoder.decoder", "co_attention.text_layers", _attention),
    ("context_decoder.anti_decoder", "co_attention.visual_layers", _attention),
    ("neck.lateral_convs", "decoder.lateral_convs", _neck),
    ("neck.fpn_convs", "decoder.fpn_convs", _neck),
    ("decode_head.scale_heads", "decoder.scale_heads", _head),
    ("decode_head.conv_seg", "decoder.classifier", _same),
]


def _rename(key: str, backwards: bool) -> str | None:
    """`key`'s name in the other layout (None: no mapping); `backwards`: ours -> released."""

    def source(entry: tuple[str, str, object]) -> str:
        return entry[1] if backwards else entry[0]

    matches = [e for e in _TABLE if key == source(e) or key.startswith(source(e) + ".")]
    if not matches:
        return None
    entry = max(matches, key=lambda e: len(source(e)))
    target = entry[0] if backwards else entry[1]
    if key == source(entry):
        return target
    renamed = entry[2](key[len(source(entry)) + 1 :].split("."), backwards)
    return ".".join([target, *renamed]) if renamed else None


def _convert(state_dict: Mapping[str, Tensor], backwards: bool, what: str) -> dict[str, Tensor]:
    converted: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        name = _rename(key, backwards)
        if name is None:
            raise ValueError(f"{what}: no mapping for tensor {key!r} {tuple(tensor.shape)}")
        if name in converted:
            raise ValueError(f"{what}: tensors map to {name!r} twice")
        converted[name] = tensor
    return converted


def from_released(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our `WeakCLIP.state_dict()` names for a released segmentor's `state_dict`.

    Raises:
        ValueError: a tensor without a mapping (named in the message), or a context that is not
            1 x n x D.
    """
    converted = _convert(state_dict, False, "released checkpoint")
    context = converted.get(_OUR_CONTEXT)
    if context is not None:
        if context.dim() != 3 or context.shape[0] != 1:
            raise ValueError(
                f"released tensor 'contexts' must be 1 x n x D, got {tuple(context.shape)}"
            )
        converted[_OUR_CONTEXT] = context[0]
    return converted


def to_released(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The released names for our `WeakCLIP.state_dict()` (the inverse of `from_released`)."""
    converted = _convert(state_dict, True, "WeakCLIP state dict")
    if _RELEASED_CONTEXT in converted:
        converted[_RELEASED_CONTEXT] = converted[_RELEASED_CONTEXT][None]
    return converted


def is_released_checkpoint(payload: Any) -> bool:
    """Whether a loaded file looks like a released checkpoint: a dict whose `state_dict` holds
    the released backbone and head (mmseg names), not one of this project's exports."""
    state = payload.get("state_dict") if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or "format" in payload:
        return False
    return "backbone.conv1.weight" in state and "decode_head.conv_seg.weight" in state


def released_class_names(payload: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names a released checkpoint's `meta` records (`CLASSES`), or None."""
    meta = payload.get("meta")
    names = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


__all__ = [
    "from_released",
    "is_released_checkpoint",
    "released_class_names",
    "to_released",
]
