"""Hostile checkpoint files (`model.pt`, `train_state.pt`, CLIP weights) for reliability tests.

`bad_checkpoints` gives every kind: a legacy raw pickle and a `torch.save` zip whose unpickling
would run `touch SENTINEL`, the same zip disguised as a TorchScript archive, a safe file of
another format, a truncated file, random bytes and an empty file.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from typing import Any

from tests.reliability.hostile import garbage, touch_command


def malicious_pickle(sentinel: str, *, protocol: int = 2) -> bytes:
    """A raw pickle (the legacy `torch.save` format) that runs a command when unpickled."""
    return pickle.dumps({"format": "weakclip-export-v1", "x": touch_command(sentinel)}, protocol)


def malicious_torch_save(sentinel: str, *, fields: Mapping[str, Any] | None = None) -> bytes:
    """A `torch.save` zip archive whose `data.pkl` runs a command when unpickled.

    Args:
        sentinel: file the command creates.
        fields: other entries of the saved dict (e.g. a plausible export's keys).
    """
    import torch

    buffer = io.BytesIO()
    torch.save({**(fields or {}), "state_dict": touch_command(sentinel)}, buffer)
    return buffer.getvalue()


def wrong_format_checkpoint() -> bytes:
    """A valid, safe `torch.save` file that is not a WeakCLIP export."""
    import torch

    buffer = io.BytesIO()
    torch.save({"format": "someone-elses-model", "weights": torch.zeros(3)}, buffer)
    return buffer.getvalue()


def torchscript_disguise(sentinel: str) -> bytes:
    """A `malicious_torch_save` archive that also holds `constants.pkl`, so that loaders which
    dispatch TorchScript archives to `torch.jit.load` take that path."""
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(malicious_torch_save(sentinel)))
    prefix = source.namelist()[0].split("/")[0]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, source.read(name))
        archive.writestr(f"{prefix}/constants.pkl", source.read(f"{prefix}/data.pkl"))
    return buffer.getvalue()


def bad_checkpoints(
    sentinel: str, *, export_format: str = "weakclip-export-v1"
) -> dict[str, bytes]:
    """Every hostile checkpoint file: {kind: bytes}. Only the malicious ones touch `sentinel`."""
    wrong = wrong_format_checkpoint()
    return {
        "malicious_legacy_pickle": malicious_pickle(sentinel),
        "malicious_torch_save": malicious_torch_save(sentinel, fields={"format": export_format}),
        "torchscript_disguise": torchscript_disguise(sentinel),
        "wrong_format": wrong,
        "truncated": truncated(wrong),
        "garbage": garbage(4096, seed=6),
        "empty": b"",
    }


def truncated(data: bytes) -> bytes:
    """The first half of a file."""
    return data[: len(data) // 2]
