"""The retrain stage (`run_retrain`): pseudo masks → a fully supervised DeepLabV3 on Ray Train
(`pipelines.training`), scored on val.

The names below are imported on first use (PEP 562): a Ray worker that imports
`pipelines.retrain.data` for its data tasks does not pay for torch and torchvision's models
through the stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.retrain.stage import RetrainConfig, RetrainOptions, run_retrain

__all__ = ["RetrainConfig", "RetrainOptions", "run_retrain"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pipelines.retrain.stage"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
