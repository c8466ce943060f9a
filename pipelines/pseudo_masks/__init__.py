"""The pseudo-mask stage: a trained WeakCLIP → one pseudo-mask PNG per image, with a visual report
(`checkpoint`, `config`, `rows` and `infer` the per-row work, `units`, `report`, `stage` the
driver `run_pseudo_masks`).
"""

from pipelines.pseudo_masks.config import PseudoMaskConfig
from pipelines.pseudo_masks.stage import PseudoMaskResult, run_pseudo_masks

__all__ = ["PseudoMaskConfig", "PseudoMaskResult", "run_pseudo_masks"]
