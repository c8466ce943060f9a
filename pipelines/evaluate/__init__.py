"""The evaluate stage: per-class IoU and mIoU of a stage's label maps against ground truth
(`plan` the join, `scoring` a unit's task and the result, `stage` the driver `run_evaluate`).
"""

from pipelines.evaluate.stage import EvaluateConfig, run_evaluate

__all__ = ["EvaluateConfig", "run_evaluate"]
