"""The Ray Train machinery both training stages run on: train (WeakCLIP) and retrain (DeepLabV3).

`run` is the driver side (re-running rules, the `TorchTrainer`, the epochs a run needs),
`worker` the worker side (device, schedule, batches, DDP, logging, checkpoint reports),
`checkpoint` the checkpoint directory format and `augment` the numpy augmentation. Not a
stage: no stage package is imported here (docs/ARCHITECTURE.md).
"""
