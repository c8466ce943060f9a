"""The Ray Train machinery both training stages (train: WeakCLIP, retrain: DeepLabV3) run on.

Not a stage: no stage package is imported here (docs/ARCHITECTURE.md).
"""
