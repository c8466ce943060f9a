"""Synthetic WSSS datasets in the MCTformer/WeakTr (or CLIP-ES) layout, for tests and the demo.

Generators `shapes` and `camouflage` (also the `colours` family); `dataset` writes them as files
that ingest reads like a real dataset and plants the defective rows ingest must quarantine. Not
a chain stage: it has no config dataclass or manifest of its own.
"""

from pipelines.synthetic.dataset import write_dataset

__all__ = ["write_dataset"]
