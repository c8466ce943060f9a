"""The retrain stage (`run_retrain`): pseudo masks → a fully supervised DeepLabV3 on Ray Train
(`pipelines.training`), scored on val.
"""

from pipelines.retrain.stage import RetrainConfig, RetrainOptions, run_retrain

__all__ = ["RetrainConfig", "RetrainOptions", "run_retrain"]
