"""The Ray Train machinery both training stages run on: train (WeakCLIP) and retrain (DeepLabV3).

`run` is the driver side (options, re-running rules, the `TorchTrainer`, export and commit),
`worker` the worker side (`train_steps`, the loop skeleton, and its parts), `data` the data
design, `checkpoint` the checkpoint format and the `model.pt` reader, `augment` the numpy
augmentation, `options` the job flags. Not a stage: no stage package is imported here
(docs/ARCHITECTURE.md).
"""
