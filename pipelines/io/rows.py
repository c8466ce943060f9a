"""How a stage refuses one untrusted input row: `RowRejected` and the image-id check.

Every stage validates the rows it reads; a row that fails raises `RowRejected` with a one-line
reason, which lands in the stage's quarantine table (`pipelines.io.manifest.Quarantine`).
"""

from __future__ import annotations

import re

# Image ids become file names in later stages (masks/<id>.png): allow a conservative alphabet only.
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class RowRejected(ValueError):
    """A row failed validation; `reason` is the one-line text stored in quarantine."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_image_id(image_id: str) -> str:
    """Returns the id if it is safe to use as a file name, else raises RowRejected."""
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id) or ".." in image_id:
        raise RowRejected(f"unsafe image id {image_id!r} (path traversal or odd characters)")
    return image_id
