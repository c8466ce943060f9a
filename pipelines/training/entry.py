"""The function Ray Train runs on every worker: a trampoline to the stage's loop.

Ray Train's controller unpickles the training function too; handing it this module's `run_loop`
instead of the stage's loop keeps torch, open_clip and the model code out of the controller's
start (the loop's module is imported by the workers alone, where it runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

LOOP_KEY = "loop"  # the loop config's "module:function" of the stage's per-worker loop


def loop_name(loop: Callable[[dict[str, Any]], None]) -> str:
    """`module:function` of a per-worker loop defined at a module's top level."""
    return f"{loop.__module__}:{loop.__qualname__}"


def run_loop(config: dict[str, Any]) -> None:
    """Imports and runs the loop `config[LOOP_KEY]` names, with `config`."""
    module, name = config[LOOP_KEY].split(":")
    getattr(importlib.import_module(module), name)(config)
