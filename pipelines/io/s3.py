"""The s3fs filesystem behind every `s3://` location, with one change to how it uploads.

botocore asks the server for `Expect: 100-continue` before sending an upload's body, and aiohttp
waits for the `100 Continue` with no timeout (its read timeout starts later), so a server that
never sends one stalls the upload for good; seen with the loopback `rclone serve s3` about
once in 20 small `pipe` calls, with the connection idle at both ends. Our clients send the body
at once: the only cost is the body of an upload the server would have refused.
"""

from __future__ import annotations

from typing import Any

import s3fs
from fsspec.asyn import sync_wrapper

# botocore's handler that adds the header runs on this event; ours, registered later, after it
_EVENT = "before-call.s3"
_HANDLER_ID = "weakclip-no-expect-continue"


def drop_expect_continue(params: dict[str, Any], **_: Any) -> None:
    """botocore `before-call` handler: remove the `Expect` header from a request's parameters."""
    params["headers"].pop("Expect", None)


class S3FileSystem(s3fs.S3FileSystem):  # type: ignore[misc]
    """`s3fs.S3FileSystem` whose clients never send `Expect: 100-continue`."""

    async def set_session(self, refresh: bool = False, kwargs: Any = None) -> Any:
        client = await super().set_session(refresh=refresh)
        # a no-op once registered (unique_id); every new client (refresh) gets it too
        client.meta.events.register(_EVENT, drop_expect_continue, unique_id=_HANDLER_ID)
        return client

    _connect = set_session
    connect = sync_wrapper(set_session)
