"""The s3fs behind `s3://` locations: uploads never wait for `100 Continue`."""

from __future__ import annotations

import pickle
from typing import Any

import s3fs

from pipelines.io import s3
from pipelines.io.storage import resolve


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sent_headers(fs: Any, path: str, data: bytes) -> list[dict[str, str]]:
    """Headers of every PutObject request `fs.pipe_file(path, data)` sends."""
    sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append({k.lower(): _text(v) for k, v in request.headers.items()})

    client = fs.connect()
    client.meta.events.register("before-send.s3.PutObject", record)
    try:
        fs.pipe_file(path, data)
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", record)
    return sent


def test_botocore_asks_for_100_continue_on_uploads(s3_bucket: str):
    """The behaviour `pipelines.io.s3` removes, so the next test means something."""
    loc = resolve(s3_bucket)
    plain = s3fs.S3FileSystem(
        endpoint_url=loc.options.endpoint_url, config_kwargs={"read_timeout": 10}
    )
    sent = _sent_headers(plain, loc.join("plain.bin"), b"x" * 1000)
    assert sent and all(h.get("expect") == "100-continue" for h in sent)


def test_uploads_send_their_body_without_expect_continue(s3_bucket: str):
    loc = resolve(s3_bucket)
    assert isinstance(loc.fs, s3.S3FileSystem)
    sent = _sent_headers(loc.fs, loc.join("ours.bin"), b"x" * 1000)
    assert sent and all("expect" not in h for h in sent)
    assert loc.fs.cat_file(loc.join("ours.bin")) == b"x" * 1000


def test_a_refreshed_or_unpickled_filesystem_keeps_the_change(s3_bucket: str):
    loc = resolve(s3_bucket)
    copy = pickle.loads(pickle.dumps(loc.fs))
    assert isinstance(copy, s3.S3FileSystem)
    copy.connect(refresh=True)
    sent = _sent_headers(copy, loc.join("copy.bin"), b"y" * 10)
    assert sent and all("expect" not in h for h in sent)
