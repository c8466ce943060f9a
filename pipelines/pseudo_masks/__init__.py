"""The pseudo-mask stage: a trained WeakCLIP → one pseudo-mask PNG per image, with a visual report.

`checkpoint` verifies train's `model.pt` before any Ray work, `rows` reads and validates rows
and post-processes them with the CRF (CPU tasks), `infer` holds the model (an actor pool),
`units` the unit of work (row groups, completion records, metrics), `report` the HTML report
and `stage` the driver (`run_pseudo_masks`).
"""

from pipelines.pseudo_masks.config import PseudoMaskConfig
from pipelines.pseudo_masks.stage import PseudoMaskResult, run_pseudo_masks

__all__ = ["PseudoMaskConfig", "PseudoMaskResult", "run_pseudo_masks"]
