"""The model checkpoint of the pseudo-mask stage: read once, hashed, loaded with
`weights_only=True` (a file that would run code is refused without running it) before any Ray
work; the actors receive the same bytes, check the digest and load them the same way.

Two layouts are accepted: train's `model.pt` export, and the authors' released `.pth`
(`weakclip.released`; its architecture is a model config, by default the paper's `vit-b-16`,
and its class names are its `meta["CLASSES"]`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pipelines.io.schema import EXPORT_FORMAT
from pipelines.io.storage import Location, StorageOptions, redact, resolve
from pipelines.io.storage import read_bytes as _read_bytes
from weakclip.config import WeakCLIPConfig, from_dict, preset, released_forward

MAX_CHECKPOINT_BYTES = 8 * 1024**3  # a ViT-B/16 export is ~0.6 GB


class CheckpointRefused(ValueError):
    """The checkpoint is unreadable, unsafe or not a WeakCLIP export."""


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint that loaded with `weights_only=True` and passed the export checks."""

    uri: str  # where it was read from (credentials never included)
    sha256: str  # of the file's bytes
    data: bytes  # the file's bytes (handed to the actors unchanged)
    class_names: tuple[str, ...]  # K class names, index = class id
    config: WeakCLIPConfig  # the model config
    iteration: int  # training iterations of the exported weights
    layout: str = "export"  # "export" (train's model.pt) or "released" (the authors' .pth)

    def __repr__(self) -> str:  # keep the bytes out of logs and error messages
        return f"VerifiedCheckpoint({self.uri!r}, sha256={self.sha256[:12]}…)"


def load_export_payload(data: bytes, *, where: str) -> dict[str, Any]:
    """The checked payload of checkpoint bytes: an export (`check_export_payload`) or a
    released checkpoint (`weakclip.released.is_released_checkpoint`), as loaded.

    Raises:
        CheckpointRefused: not loadable with weights_only, or neither layout.
    """
    from pipelines.training.checkpoint import check_export_payload, load_weights_only
    from weakclip.released import is_released_checkpoint

    try:
        payload = load_weights_only(data, what="checkpoint", where=where)
        if is_released_checkpoint(payload):
            return payload
        return check_export_payload(payload, fmt=EXPORT_FORMAT, kind="WeakCLIP", where=where)
    except ValueError as exc:
        raise CheckpointRefused(
            f"checkpoint refused: {exc}; only a WeakCLIP model.pt export (the train stage's) "
            "or a released WeakCLIP .pth is accepted, nothing in the file was executed"
        ) from None


def _released_model(payload: dict[str, Any], config: WeakCLIPConfig, where: str) -> Any:
    """The WeakCLIP of a released payload (`build_released`), refusals as CheckpointRefused."""
    from weakclip.build import build_released

    try:
        return build_released(payload, config)
    except ValueError as exc:
        raise CheckpointRefused(f"checkpoint {where}: {exc}") from None


def verify_checkpoint(
    uri: str | Location,
    storage: StorageOptions | None = None,
    released_config: WeakCLIPConfig | None = None,
) -> VerifiedCheckpoint:
    """Reads, hashes and safely loads a checkpoint; no Ray involved. A released checkpoint is
    built once here with `released_config` (None: the `vit-b-16` preset) so that a tensor that
    does not fit is refused before any work.

    Raises:
        CheckpointRefused: missing, too large, unsafe, neither layout, or a released
            checkpoint that does not fit its config (one-line message).
    """
    location = uri if isinstance(uri, Location) else resolve(uri, storage)
    try:
        data = _read_bytes(location, max_bytes=MAX_CHECKPOINT_BYTES)
    except (OSError, ValueError) as exc:
        raise CheckpointRefused(f"cannot read checkpoint: {redact(str(exc))}") from None
    payload = load_export_payload(data, where=location.uri)
    released = "format" not in payload
    if released:
        config = released_forward(released_config or preset("vit-b-16"))
        class_names = _released_model(payload, config, location.uri).class_names
        meta = payload.get("meta")
        iteration = meta.get("iter") if isinstance(meta, dict) else None
    else:
        try:
            config = from_dict(payload["config"], WeakCLIPConfig)
        except (TypeError, ValueError) as exc:
            raise CheckpointRefused(f"checkpoint {location.uri}: bad model config: {exc}") from None
        class_names, iteration = payload["class_names"], payload.get("iteration")
    return VerifiedCheckpoint(
        uri=location.uri,
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        class_names=tuple(class_names),
        config=config,
        iteration=int(iteration) if isinstance(iteration, int) else -1,
        layout="released" if released else "export",
    )


def build_model(
    data: bytes, *, sha256: str, released_config: WeakCLIPConfig | None = None
) -> tuple[Any, Any]:
    """The `WeakCLIP` (eval mode) and `WeakCLIPConfig` of verified checkpoint bytes (actors);
    `released_config` is a released checkpoint's (`VerifiedCheckpoint.config`).

    Raises:
        CheckpointRefused: the bytes are not the verified checkpoint, or do not load.
    """
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointRefused("checkpoint bytes do not match the verified SHA-256")
    from pipelines.training.checkpoint import weakclip_from_export

    where = f"sha256:{sha256[:12]}"
    payload = load_export_payload(data, where=where)
    if "format" not in payload:
        config = released_config or released_forward(preset("vit-b-16"))
        return _released_model(payload, config, where), config
    return weakclip_from_export(payload)
