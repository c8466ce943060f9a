"""WeakCLIP model library: tensors in, tensors out (no Ray, no object storage, no printing).

The public names below load lazily, so `import weakclip.config` stays free of torch and jobs
can parse and validate a configuration before the heavy imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "WeakCLIPConfig": "weakclip.config",
    "TrainConfig": "weakclip.config",
    "preset": "weakclip.config",
    "from_dict": "weakclip.config",
    "to_dict": "weakclip.config",
    "build_weakclip": "weakclip.build",
    "clip_weights_digest": "weakclip.build",
    "WeakCLIP": "weakclip.model",
    "WeakCLIPOutput": "weakclip.model",
}

__all__ = [
    "TrainConfig",
    "WeakCLIP",
    "WeakCLIPConfig",
    "WeakCLIPOutput",
    "build_weakclip",
    "clip_weights_digest",
    "from_dict",
    "preset",
    "to_dict",
]

if TYPE_CHECKING:
    from weakclip.build import build_weakclip, clip_weights_digest
    from weakclip.config import TrainConfig, WeakCLIPConfig, from_dict, preset, to_dict
    from weakclip.model import WeakCLIP, WeakCLIPOutput


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weakclip' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
