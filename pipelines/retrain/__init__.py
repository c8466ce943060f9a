"""The retrain stage: pseudo masks → a fully supervised DeepLabV3 on Ray Train, scored on val.

`data` joins the pseudo-mask index with its source rows and feeds Ray Data, `model` builds
and exports the network, `loop` is the per-worker loop, `evaluation` scores the val rows,
`stage` drives the run (`run_retrain`). The Ray Train machinery it shares with train is
`pipelines.training`.
"""

from pipelines.retrain.stage import RetrainConfig, RetrainOptions, RetrainResult, run_retrain

__all__ = ["RetrainConfig", "RetrainOptions", "RetrainResult", "run_retrain"]
