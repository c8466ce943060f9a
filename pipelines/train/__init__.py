"""The train stage: WeakCLIP on refine seeds with Ray Train, exported as a self-contained model.pt.

`data` turns refine shards into augmented batches (Ray Data), `loop` is the per-worker
training loop (with `crf_pool` for the boundary loss's CRF), `export` rebuilds and exports
the model, `stage` drives the run (`run_train`). The Ray Train machinery it shares with
retrain is `pipelines.training`.
"""

from pipelines.train.stage import TrainJobConfig, TrainResult, run_train
from pipelines.training.run import TrainRefused

__all__ = ["TrainJobConfig", "TrainRefused", "TrainResult", "run_train"]
