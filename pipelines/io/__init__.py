"""Storage, manifests, shard columns, codecs and class spaces: what every stage reads and writes.

No stage logic lives here, and nothing here imports a stage package (docs/ARCHITECTURE.md).
"""
