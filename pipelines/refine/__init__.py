"""The refine stage: ingested CAMs → dense-CRF seed labels, one Ray task per row group.

`rows` refines one row (pure), `units` one row group (enumeration, task, records, metrics),
`stage` drives the run (`run_refine`); the seed recipe is `pipelines.seeds`.
"""

from pipelines.refine.stage import RefineConfig, RefineResult, run_refine

__all__ = ["RefineConfig", "RefineResult", "run_refine"]
