"""The ingest stage: raw WSSS inputs (images, CAMs, image-level labels) → Parquet shards.

`listing` enumerates the candidate rows, `chunks` validates and writes one chunk per Ray task
(`rows` checks one row), `stage` drives the run (`run_ingest`).
"""

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.stage import IngestResult, run_ingest

__all__ = ["IngestConfig", "IngestResult", "run_ingest"]
