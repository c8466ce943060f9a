"""The train stage (`run_train`): WeakCLIP on refine seeds with Ray Train (`pipelines.training`),
exported as a self-contained model.pt.
"""

from pipelines.train.stage import TrainJobConfig, run_train
from pipelines.training.run import TrainRefused

__all__ = ["TrainJobConfig", "TrainRefused", "run_train"]
