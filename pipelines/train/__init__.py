"""The train stage (`run_train`): WeakCLIP on refine seeds with Ray Train (`pipelines.training`),
exported as a self-contained model.pt.

The names below are imported on first use (PEP 562): a Ray worker that imports
`pipelines.train.data` for its data tasks does not pay for torch and open_clip through the stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.train.stage import TrainJobConfig, run_train
    from pipelines.training.run import TrainRefused

__all__ = ["TrainJobConfig", "TrainRefused", "run_train"]
_HOMES = {
    "TrainJobConfig": "pipelines.train.stage",
    "run_train": "pipelines.train.stage",
    "TrainRefused": "pipelines.training.run",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
