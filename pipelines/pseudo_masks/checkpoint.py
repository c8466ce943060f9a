"""The model checkpoint of the pseudo-mask stage: read once, hashed, loaded with
`weights_only=True` (a file that would run code is refused without running it) before any Ray
work; the actors receive the same bytes, check the digest and load them the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pipelines.io.schema import EXPORT_FORMAT
from pipelines.io.storage import Location, StorageOptions, redact, resolve
from pipelines.io.storage import read_bytes as _read_bytes
from weakclip.config import WeakCLIPConfig, from_dict

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

    def __repr__(self) -> str:  # keep the bytes out of logs and error messages
        return f"VerifiedCheckpoint({self.uri!r}, sha256={self.sha256[:12]}…)"


def load_export_payload(data: bytes, *, where: str) -> dict[str, Any]:
    """The checked export payload of checkpoint bytes (`read_export_payload`).

    Raises:
        CheckpointRefused: not loadable with weights_only, or not a WeakCLIP export.
    """
    from pipelines.training.checkpoint import read_export_payload

    try:
        return read_export_payload(data, fmt=EXPORT_FORMAT, kind="WeakCLIP", where=where)
    except ValueError as exc:
        raise CheckpointRefused(
            f"checkpoint refused: {exc}; only a WeakCLIP model.pt export (the train stage's) "
            "is accepted, nothing in the file was executed"
        ) from None


def verify_checkpoint(
    uri: str | Location, storage: StorageOptions | None = None
) -> VerifiedCheckpoint:
    """Reads, hashes and safely loads a checkpoint; no Ray involved.

    Raises:
        CheckpointRefused: missing, too large, unsafe or not an export (one-line message).
    """
    location = uri if isinstance(uri, Location) else resolve(uri, storage)
    try:
        data = _read_bytes(location, max_bytes=MAX_CHECKPOINT_BYTES)
    except (OSError, ValueError) as exc:
        raise CheckpointRefused(f"cannot read checkpoint: {redact(str(exc))}") from None
    payload = load_export_payload(data, where=location.uri)
    try:
        config = from_dict(payload["config"], WeakCLIPConfig)
    except (TypeError, ValueError) as exc:
        raise CheckpointRefused(f"checkpoint {location.uri}: bad model config: {exc}") from None
    iteration = payload.get("iteration")
    return VerifiedCheckpoint(
        uri=location.uri,
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        class_names=tuple(payload["class_names"]),
        config=config,
        iteration=int(iteration) if isinstance(iteration, int) else -1,
    )


def build_model(data: bytes, *, sha256: str) -> tuple[Any, Any]:
    """The `WeakCLIP` (eval mode) and `WeakCLIPConfig` of verified checkpoint bytes (actors).

    Raises:
        CheckpointRefused: the bytes are not the verified checkpoint, or do not load.
    """
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointRefused("checkpoint bytes do not match the verified SHA-256")
    from pipelines.training.checkpoint import weakclip_from_export

    return weakclip_from_export(load_export_payload(data, where=f"sha256:{sha256[:12]}"))
