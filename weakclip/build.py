"""Builds WeakCLIP from a config: the only place that reads a checkpoint (CLIP weights, or a
whole model in the authors' released layout: `build_released`).

CLIP weights come from a local file (fetching from object storage is the caller's job):
- an open_clip state dict, `.safetensors` or a `torch.save` file (`.bin`, `.pt`, `.pth`), read
  with `weights_only=True`; a `{"state_dict": ...}` wrapper and a `module.` prefix are accepted;
- an OpenAI TorchScript archive (`ViT-B-16.pt` as OpenAI publishes it). Loading TorchScript
  runs `torch.jit.load`, which is not safe for untrusted files: pass trusted files only.
Or, on machines with internet, `tag:<name>` asks open_clip for its pretrained tag `<name>`
(e.g. `tag:openai`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from typing import IO, Literal

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from weakclip.clip_encoder import CLIPImageEncoder
from weakclip.co_attention import CoAttentionMatching
from weakclip.config import CLIPConfig, WeakCLIPConfig, released_forward
from weakclip.decoder import TextGuidedDecoder
from weakclip.model import WeakCLIP
from weakclip.prompt import PromptTextEncoder
from weakclip.pyramid_adapter import PyramidAdapter
from weakclip.released import (
    from_released,
    is_released_checkpoint,
    released_class_names,
    to_released,
)

WeightsFormat = Literal["torchscript", "state_dict", "safetensors"]
TAG_PREFIX = "tag:"
# Entries of an OpenAI state dict that are metadata, not CLIP parameters.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def build_weakclip(
    config: WeakCLIPConfig,
    class_names: Sequence[str],
    *,
    clip_weights: str | os.PathLike[str] | None = None,
) -> WeakCLIP:
    """Builds the WeakCLIP segmenter.

    Args:
        config: the model configuration (`weakclip.config.preset(...)`).
        class_names: K raw class names, index = class id, "background" first for WSSS.
        clip_weights: a local CLIP weights file, `tag:<name>` for an open_clip pretrained tag,
            or None for random CLIP weights (tests, benchmarks).

    Returns:
        The model in train mode; its CLIP weights are frozen (but for the image encoder's
        with `clip.train_image_encoder`).

    Raises:
        ValueError: unknown architecture, unreadable or mismatched weights, a class name that
            does not fit the prompt, or config values that do not fit the backbone.
    """
    clip = build_clip(config.clip, clip_weights=clip_weights)
    image_encoder = CLIPImageEncoder(
        visual=clip.visual,
        input_size=config.clip.input_size,
        tap_layers=config.clip.tap_layers,
        class_embedding_twice=config.clip.class_embedding_twice,
        drop_path_rate=config.clip.drop_path_rate,
    )
    if config.clip.train_image_encoder:  # not the paper's: see `CLIPConfig`
        image_encoder.requires_grad_(True)
    if image_encoder.width != config.adapter.channels:
        raise ValueError(
            f"adapter.channels={config.adapter.channels} must equal the ViT width "
            f"{image_encoder.width} of {config.clip.model_name}"
        )
    text_encoder = PromptTextEncoder(
        clip=clip,
        class_names=class_names,
        num_context=config.prompt.num_context,
        context_length=config.prompt.context_length,
    )
    if text_encoder.embed_dim != image_encoder.embed_dim:
        raise ValueError(
            f"text and image embeddings differ: {text_encoder.embed_dim} vs "
            f"{image_encoder.embed_dim}"
        )
    co = config.co_attention
    model = WeakCLIP(
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        adapter=PyramidAdapter(
            channels=config.adapter.channels, trainable=config.adapter.trainable
        ),
        co_attention=CoAttentionMatching(
            embed_dim=image_encoder.embed_dim,
            width=co.width,
            heads=co.heads,
            layers=co.layers,
            dropout=co.dropout,
            mlp_ratio=co.mlp_ratio,
            temperature_init=co.temperature_init,
            chain_layers=co.chain_layers,
        ),
        decoder=TextGuidedDecoder(
            in_channels=config.adapter.channels,
            num_classes=len(class_names),
            width=config.decoder.width,
            head_blocks=config.decoder.head_blocks,
            dropout=config.decoder.dropout,
            upsample_by_two=config.decoder.upsample_by_two,
            default_init=config.decoder.default_init,
        ),
        tau=config.loss.tau,
    )
    return model.train()


def read_released_checkpoint(path: str | os.PathLike[str]) -> dict[str, object]:
    """A released checkpoint file (`{"meta", "state_dict", ...}`), read with `weights_only=True`.

    Raises:
        ValueError: missing, not loadable without running code, or not the released layout.
    """
    path = os.fspath(path)
    if is_torchscript_archive(path):  # torch.load would hand it to torch.jit.load
        raise ValueError(f"cannot read released checkpoint {path!r}: a TorchScript archive")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or unsafe files
        raise ValueError(f"cannot read released checkpoint {path!r}: {error}") from None
    if not is_released_checkpoint(payload):
        raise ValueError(f"{path!r} is not a released WeakCLIP checkpoint (mmseg layout)")
    return dict(payload)


def build_released(
    payload: Mapping[str, object],
    config: WeakCLIPConfig,
    class_names: Sequence[str] | None = None,
) -> WeakCLIP:
    """The WeakCLIP of a released checkpoint, in eval mode, every weight loaded strictly.

    Args:
        payload: the loaded file (`read_released_checkpoint`).
        config: its architecture (e.g. `preset("vit-b-16")`, the released models'); the forward
            flags a released model needs are set here (`released_forward`).
        class_names: K names; None takes the checkpoint's `meta["CLASSES"]`.

    Raises:
        ValueError: not the released layout, no class names, or a tensor that does not fit the
            architecture (named, in the released layout).
    """
    if not is_released_checkpoint(payload):
        raise ValueError("not a released WeakCLIP checkpoint (mmseg layout)")
    names = tuple(class_names) if class_names is not None else released_class_names(payload)
    if not names:
        raise ValueError("the released checkpoint records no class names (meta CLASSES)")
    state = from_released(payload["state_dict"])  # type: ignore[arg-type]
    model = build_weakclip(released_forward(config), names)
    expected = model.state_dict()
    for name in sorted(set(expected) ^ set(state)):
        released_name = next(iter(to_released({name: expected.get(name, state.get(name))})))
        what = "lacks" if name in expected else "has a tensor this architecture does not:"
        raise ValueError(f"released checkpoint {what} {released_name!r}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            released_name = next(iter(to_released({name: tensor})))
            raise ValueError(
                f"released tensor {released_name!r} has shape {tuple(tensor.shape)}, the config "
                f"expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


def build_clip(config: CLIPConfig, *, clip_weights: str | os.PathLike[str] | None = None) -> CLIP:
    """Builds the open_clip CLIP of `config` in float32 and loads its weights.

    Args:
        config: the backbone configuration.
        clip_weights: see `build_weakclip`.

    Returns:
        An open_clip `CLIP` (not yet frozen, position embeddings at the checkpoint's grid).
    """
    tag = None
    if clip_weights is not None and str(clip_weights).startswith(TAG_PREFIX):
        tag = str(clip_weights)[len(TAG_PREFIX) :]
        if config.custom is not None or not tag:
            raise ValueError(f"pretrained tags need a named open_clip model, got {clip_weights!r}")
    if config.custom is not None:
        custom = config.custom
        clip = CLIP(
            custom.embed_dim,
            vision_cfg=CLIPVisionCfg(
                layers=custom.vision_layers,
                width=custom.vision_width,
                head_width=custom.vision_head_width,
                patch_size=custom.patch_size,
                image_size=custom.image_size,
            ),
            text_cfg=CLIPTextCfg(
                context_length=custom.text_context_length,
                width=custom.text_width,
                heads=custom.text_heads,
                layers=custom.text_layers,
            ),
            quick_gelu=custom.quick_gelu,
        )
    else:
        if config.model_name not in open_clip.list_models():
            raise ValueError(f"clip.model_name {config.model_name!r} is not an open_clip model")
        # No network unless a tag was asked for: pretrained=None builds random weights offline.
        clip = open_clip.create_model(config.model_name, pretrained=tag)
        if not isinstance(clip, CLIP):
            raise ValueError(
                f"clip.model_name {config.model_name!r} builds a {type(clip).__name__}; only "
                "open_clip CLIP models with a native text tower are supported"
            )
    clip = clip.float()
    if clip_weights is not None and tag is None:
        state_dict = read_clip_state_dict(clip_weights)
        load_clip_state_dict(clip, state_dict, source=str(clip_weights))
    return clip


def read_clip_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads CLIP weights from a local file (see the module docstring for the formats)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"CLIP weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    if is_torchscript_archive(path):
        # Trusted files only (module docstring): TorchScript archives carry code.
        try:
            archive = torch.jit.load(path, map_location="cpu")
        except Exception as error:  # TorchScript reports unknown types as RuntimeError
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"cannot read CLIP weights {path!r} (TorchScript): {reason}") from None
        return {k: v.detach().clone() for k, v in archive.state_dict().items()}
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or unsafe files
        raise ValueError(f"cannot read CLIP weights {path!r}: {error}") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(f"CLIP weights {path!r} do not hold a state dict of tensors")
    return dict(loaded)


def load_clip_state_dict(
    clip: CLIP, state_dict: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Loads a CLIP state dict into `clip` strictly, casting to `clip`'s float32.

    Accepts open_clip keys, OpenAI keys (the same, plus metadata entries) and `module.`-prefixed
    keys from data-parallel training.
    """
    expected = clip.state_dict()
    # Non-persistent buffers (the causal mask) are derived, but traced archives store them.
    derived = {name for name, _ in clip.named_buffers()} - set(expected)
    cleaned = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in _OPENAI_METADATA_KEYS or key in derived:
            continue
        cleaned[key] = value
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"CLIP weights {source!r} do not fit this architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [k for k, v in cleaned.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"CLIP weights {source!r}: {key} has shape {tuple(cleaned[key].shape)}, the "
            f"architecture expects {tuple(expected[key].shape)} ({len(wrong)} mismatches)"
        )
    # OpenAI files are partly float16; copying into float32 parameters upcasts exactly.
    clip.load_state_dict(cleaned, strict=True)


def clip_weights_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a weights file, recorded beside everything built from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_clip_weights(clip: CLIP, path: str | os.PathLike[str], fmt: WeightsFormat) -> None:
    """Writes `clip`'s weights in one of the formats `build_clip` reads.

    Args:
        clip: an open_clip CLIP.
        path: destination file.
        fmt: "state_dict" (`torch.save` of the state dict), "safetensors", or "torchscript"
            (a traced archive whose state dict has OpenAI's key layout, as OpenAI ships it).
    """
    path = os.fspath(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    if fmt == "state_dict":
        torch.save(state_dict, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, path)
    elif fmt == "torchscript":
        torch.jit.save(_trace(clip), path)
    else:
        raise ValueError(f"fmt must be torchscript, state_dict or safetensors, got {fmt!r}")


def _trace(clip: CLIP) -> torch.jit.ScriptModule:
    was_training = clip.training
    clip.eval()
    size = clip.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.zeros(1, 3, height, width)
    text = torch.zeros(1, clip.context_length, dtype=torch.long)
    try:
        with warnings.catch_warnings():
            # Only the archive's weights matter; the traced graph is never run.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace_module(
                clip, {"encode_image": (images,), "encode_text": (text,)}, check_trace=False
            )
    finally:
        clip.train(was_training)
    return traced


def is_torchscript_archive(source: str | IO[bytes]) -> bool:
    """Whether a file (path or seekable binary handle, left at its start) is a TorchScript
    archive: those zips carry compiled code and constants; `torch.save` zips only data."""
    try:
        if not zipfile.is_zipfile(source):
            return False
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    finally:
        if not isinstance(source, str):
            source.seek(0)
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)
