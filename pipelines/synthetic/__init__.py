"""Synthetic WSSS datasets in the MCTformer/WeakTr (or CLIP-ES) layout, for tests and the demo.

Two independent generators: `shapes` (six classes told apart by colour) and `camouflage` (VOC or
COCO ids that only silhouette and texture give away; with one colour per class it is the
colour-separable `colours` family). `dataset` writes any of them as files that
ingest reads like a real dataset (`write_dataset`, what `jobs.make_synthetic` calls) and
plants the defective rows ingest must quarantine. Not a chain stage: it has no config
dataclass or manifest of its own.
"""

from pipelines.synthetic.dataset import write_dataset

__all__ = ["write_dataset"]
