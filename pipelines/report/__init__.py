"""Visual reports: image strips (`strips`), plots (`plots`) and the report of a pipeline run
(`run`), built from stage manifests and metrics files only (docs/CONTRACTS.md, report)."""
