"""The trained WeakCLIP from a checkpoint directory, and the self-contained `model.pt` export.

`model.pt` (docs/CONTRACTS.md, train) is one `torch.save` of plain containers and tensors:
every weight (frozen CLIP included), the config dict and the class names, tagged with
`EXPORT_FORMAT`; it loads with `torch.load(path, weights_only=True)` and `load_exported_model`
rebuilds the `WeakCLIP`. The checkpoint directory format is `pipelines.training.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from pipelines.io.schema import EXPORT_FORMAT
from pipelines.training import checkpoint as ckpt
from weakclip.build import build_weakclip
from weakclip.config import WeakCLIPConfig, from_dict, to_dict
from weakclip.model import WeakCLIP


def load_model_weights(
    model: nn.Module,
    *,
    trainable: Mapping[str, torch.Tensor],
    clip: Mapping[str, torch.Tensor] | None,
    frozen: Iterable[str],
) -> None:
    """Loads a checkpoint's trainable state (and stored CLIP weights) into a built model.

    Every key of the model must be covered: trainable keys by `trainable`, frozen CLIP keys
    by `clip` or by the weights the model was built with (clip=None).
    """
    frozen = set(frozen)
    expected = set(model.state_dict())
    missing = sorted(expected - frozen - set(trainable))
    unexpected = sorted(set(trainable) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    merged = dict(trainable)
    if clip is not None:
        if set(clip) != frozen:
            raise ValueError("stored CLIP weights do not match the model's frozen parameters")
        merged.update(clip)
    result = model.load_state_dict(merged, strict=False)
    if result.unexpected_keys or (set(result.missing_keys) - (frozen if clip is None else set())):
        raise ValueError(f"checkpoint does not fit the model: {result}")


def load_checkpoint_model(directory: str, *, clip_weights: str | None) -> WeakCLIP:
    """The trained model of a local checkpoint directory, in eval mode; `clip_weights` is the
    local CLIP weights file the run used (None when the checkpoint stores its random CLIP)."""
    meta = ckpt.read_meta(directory)
    config = from_dict(meta["config"], WeakCLIPConfig)
    clip_state = ckpt.read_clip_state(directory)
    if clip_state is None and clip_weights is None:
        raise ValueError("the checkpoint stores no CLIP weights: pass the CLIP weights file")
    model = build_weakclip(
        config, meta["class_names"], clip_weights=None if clip_state is not None else clip_weights
    )
    frozen = ckpt.frozen_parameter_names(model)
    state = ckpt.read_train_state(directory)
    load_model_weights(model, trainable=state["model"], clip=clip_state, frozen=frozen)
    return model.eval()


def export_model(
    path: str,
    *,
    model: nn.Module,
    config: WeakCLIPConfig,
    class_names: Sequence[str],
    clip_source: str | None,
    clip_sha256: str,
    iteration: int,
) -> None:
    """Writes the self-contained `model.pt` (module docstring)."""
    ckpt.write_export(
        path,
        fmt=EXPORT_FORMAT,
        model=model,
        config=to_dict(config),
        class_names=list(class_names),
        clip_weights={"source": clip_source, "sha256": clip_sha256},
        iteration=int(iteration),
    )


def load_exported_model(path: str) -> WeakCLIP:
    """Rebuilds the `WeakCLIP` of a `model.pt` export (read with `weights_only=True` and
    checked), in eval mode (no CLIP weights file)."""
    payload = ckpt.read_export_payload(path, fmt=EXPORT_FORMAT, kind="WeakCLIP")
    return ckpt.weakclip_from_export(payload)[0]
