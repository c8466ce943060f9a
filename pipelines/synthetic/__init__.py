"""Synthetic WSSS datasets for tests and the demo: generators `shapes` and `camouflage` (also
the `colours` family), written by `dataset` in a real layout. Not a chain stage (no manifest).
"""

from pipelines.synthetic.dataset import write_dataset

__all__ = ["write_dataset"]
