"""The evaluate stage: per-class IoU and mIoU of a stage's label maps against ground truth.

`plan` joins predictions with ground-truth rows and cuts the work into units, `scoring` is
one unit's task and the result it sums to, `stage` drives the run (`run_evaluate`).
"""

from pipelines.evaluate.stage import EvaluateConfig, run_evaluate

__all__ = ["EvaluateConfig", "run_evaluate"]
